"""Shared inputs for the fine-tuning tests: a tiny random base model with the test tokenizer, an
instruction JSONL, and a small, fast config validated the way the CLI validates YAML."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.components.finetune.config import FinetuneConfig, load_finetune_config
from lmforge.model.checkpoint import save_model_dir
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer


def build_base(out: Path, tokenizer_dir: Path) -> Path:
    """A tiny random base model (vocab 400 = the test tokenizer's, eos = <|eos|> = 1) with its tokenizer."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=400, eos_token_id=1, n_layers=2))
    return save_model_dir(model, out, tokenizer_dir=tokenizer_dir)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def instruction_records(n: int = 16) -> list[dict]:
    return [
        {"prompt": f"Question {i}: what does the quick brown fox do?", "response": f" It jumps over dog {i}."}
        for i in range(n)
    ]


def make_config(base: Path, train: Path, out: Path, *overrides: str) -> FinetuneConfig:
    """LoRA r=4 on q/v, 4 steps of 4 rows (micro 2), checkpoints every 2 steps, no MLflow."""
    return load_finetune_config(
        None,
        [
            f"base_model={base}",
            f"data.train={train}",
            f"data.validation={train}",
            f"output_dir={out}",
            "max_seq_len=48",
            "data.global_batch_size=4",
            "data.micro_batch_size=2",
            "schedule.max_steps=4",
            "schedule.warmup_steps=1",
            "optim.lr=1e-2",
            "eval.every=2",
            "eval.batches=2",
            "checkpoint.every=2",
            "tracking.enabled=false",
            "tracking.log_every=1",
            "lora.r=4",
            "lora.target_modules=[q_proj, v_proj]",
            *overrides,
        ],
    )
