"""Fixtures for the serving tests: a tiny random-weights model with the tiny test tokenizer
(`tokenizer_dir`, tests/conftest.py), saved as a model directory like any other lmforge model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


def make_model_dir(
    root: Path, tokenizer_dir: Path, seed: int, name: str = "tiny-model", max_seq_len: int = 128
) -> Path:
    """A tiny random model whose vocabulary matches the tokenizer; `seed` makes versions differ."""
    from lmforge.components.tokenizer import TokenizerInfo
    from lmforge.model.checkpoint import save_model_dir
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    info = TokenizerInfo.from_dir(tokenizer_dir)
    torch.manual_seed(seed)
    # a larger init makes the random logits peaked, so greedy choices are far from ties
    cfg = ModelConfig.from_name(
        "tiny",
        vocab_size=info.vocab_size,
        max_seq_len=max_seq_len,
        init_std=0.3,
        bos_token_id=info.bos_id,
        eos_token_id=info.eos_id,
        pad_token_id=info.pad_id,
    )
    model = Transformer(cfg).eval()
    return save_model_dir(model, root / name, tokenizer_dir=tokenizer_dir)


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


@dataclass
class Registry:
    tracking_uri: str
    client: object  # lmforge.registry.RegistryClient
    name: str
    versions: dict[str, Path]  # version -> the model directory registered as it


@pytest.fixture(scope="session")
def registry(tmp_path_factory, tokenizer_dir) -> Registry:
    """A real MLflow registry (sqlite + local artifacts) holding two versions of "tiny"; the alias
    "champion" points at version 1. Tests that move the alias put it back."""
    from lmforge.registry import RegistryClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = RegistryClient(uri)
    dirs = {}
    for seed in (0, 1):
        # a longer context than the other fixtures: long generations stay in flight across a swap
        model_dir = make_model_dir(
            root / "src", tokenizer_dir, seed, name=f"tiny-v{seed + 1}", max_seq_len=1024
        )
        version = client.register_model_dir(model_dir, "tiny", alias="champion" if seed == 0 else None)
        dirs[version.version] = model_dir
    assert sorted(dirs) == ["1", "2"]
    return Registry(uri, client, "tiny", dirs)
