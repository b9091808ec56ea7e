"""Fixtures for the serving tests: a tiny random-weights model with a tiny byte-level BPE tokenizer
(trained here, in a second), saved as a model directory like any other lmforge model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving language models over HTTP with continuous batching.",
    "Héllo wörld: naïve café, déjà vu, and emoji 🙂 in UTF-8.",
    "def add(a, b):\n    return a + b\n",
    "Private domain-specific models for support tickets and manuals.",
] * 20


def make_model_dir(root: Path, tokenizer_dir: Path, seed: int, name: str = "tiny-model") -> Path:
    """A tiny random model whose vocabulary matches the tokenizer; `seed` makes versions differ."""
    from components.tokenizer import TokenizerInfo
    from model.checkpoint import save_model_dir
    from model.config import ModelConfig
    from model.transformer import Transformer

    info = TokenizerInfo.from_dir(tokenizer_dir)
    torch.manual_seed(seed)
    # a larger init makes the random logits peaked, so greedy choices are far from ties
    cfg = ModelConfig.from_name("tiny", vocab_size=info.vocab_size, max_seq_len=128, init_std=0.3,
                                bos_token_id=info.bos_id, eos_token_id=info.eos_id, pad_token_id=info.pad_id)
    model = Transformer(cfg).eval()
    return save_model_dir(model, root / name, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from components.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("serving-tokenizer")
    train_tokenizer(iter(TEXTS), out, vocab_size=400, min_frequency=2, holdout_fraction=0.0,
                    reference_tokenizers=[])
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serving-model"), tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def model_dir_v2(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serving-model-v2"), tokenizer_dir, seed=1)


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch):
    """Tests decide about API keys themselves; a developer's exported keys must not leak in."""
    monkeypatch.delenv("LMFORGE_API_KEYS", raising=False)
    monkeypatch.delenv("LMFORGE_ADMIN_API_KEYS", raising=False)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
