"""Tiny models and task files for the evaluate tests (imported by tests/components/test_evaluate_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving language models over HTTP with continuous batching.",
    "Héllo wörld: naïve café, déjà vu, and emoji 🙂 in UTF-8.",
    "def add(a, b):\n    return a + b\n",
    "Private domain-specific models for support tickets and manuals. " * 4,
]


def make_model(tokenizer_dir: Path, out: Path, seed: int = 0, max_seq_len: int = 64) -> Path:
    """A random tiny lmforge model over the test tokenizer, saved as a model directory."""
    from lmforge.components.tokenizer import TokenizerInfo
    from lmforge.model.checkpoint import save_model_dir
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    info = TokenizerInfo.from_dir(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name(
        "tiny",
        vocab_size=info.vocab_size,
        max_seq_len=max_seq_len,
        bos_token_id=info.bos_id,
        eos_token_id=info.eos_id,
        pad_token_id=info.pad_id,
    )
    return save_model_dir(Transformer(cfg).eval(), out, tokenizer_dir=tokenizer_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_suite(root: Path, extra: str = "") -> Path:
    """A suite with one task of each type over small JSONL files in `root`."""
    write_jsonl(root / "heldout.jsonl", [{"text": d} for d in DOCS])
    write_jsonl(
        root / "qa.jsonl",
        [{"question": d[:24], "answer": d[24:40]} for d in DOCS[:4]],
    )
    write_jsonl(
        root / "choice.jsonl",
        [{"question": d[:20], "choices": [d[20:32], "zebra"], "answer": 0} for d in DOCS[:4]],
    )
    suite = root / "suite.yaml"
    suite.write_text(
        f"""{extra}
tasks:
  - {{name: heldout, type: perplexity, data: heldout.jsonl, text: text}}
  - name: qa
    type: generate
    data: qa.jsonl
    prompt: "Q: {{question}}\\nA:"
    target: answer
    metrics: [rouge1, rouge2, rougeL, bleu, chrf, exact_match, token_f1]
    max_new_tokens: 6
    stop: ["\\n"]
  - {{name: pick, type: choice, data: choice.jsonl, prompt: "{{question}}", choices: choices, answer: answer}}
"""
    )
    return suite
