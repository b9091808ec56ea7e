"""Shared inputs for the compression tests (prune, distill, ONNX export): the sample token shards and a
tiny model trained on them for a few dozen steps in this process, so it has something to lose."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from _pretrain_data import build_sample_shards, tiny_config

from lmforge.components.pretrain import pretrain


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread while the block runs. On a shared 2-core machine under load, two
    spinning threads per process made a tiny model's training step ~13x slower (2.2 s vs 0.16 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tiny_model(root: Path, steps: int = 40, *overrides: str) -> tuple[Path, Path]:
    """(token shards, trained model dir) under `root`: the tiny preset (2 layers, GQA 4:2) on the
    sample shards, `steps` in-process steps. The model directory holds the tokenizer."""
    shards = build_sample_shards(root / "data")
    cfg = tiny_config(
        shards,
        root / "teacher-run",
        "model.overrides.n_layers=2",
        f"schedule.max_steps={steps}",
        "schedule.warmup_steps=4",
        f"checkpoint.every={steps}",
        "eval.every=0",
        *overrides,
    )
    result = pretrain(cfg, verbose=False)
    assert result.model_dir is not None
    return shards, result.model_dir
