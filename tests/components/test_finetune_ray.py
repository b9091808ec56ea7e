"""`lmforge finetune` on Ray Train: 2 CPU workers (gloo DDP) train the same adapter as one process
(the rows of a step do not depend on the worker count), and the adapter is written in PEFT layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _finetune_data import build_base, instruction_records, make_config, write_jsonl
from safetensors.torch import load_file

from lmforge.components.finetune.stage import finetune

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RAY_TOL = 2e-5  # 2-worker gloo all-reduce vs. one process: same math, different summation order


def test_lora_on_two_ray_workers_matches_in_process(ray_local, tokenizer_dir: Path, tmp_path: Path) -> None:
    base = build_base(tmp_path / "base", tokenizer_dir)
    train = write_jsonl(tmp_path / "train.jsonl", instruction_records())
    sets = ("schedule.max_steps=3", "packing=true", "eval.batches=100")  # validation: every row
    local = finetune(make_config(base, train, tmp_path / "local", *sets))
    ray = finetune(make_config(base, train, tmp_path / "ray", *sets, "ray.num_workers=2"), verbose=False)
    assert ray.step == 3 and (ray.adapter_dir / "adapter_config.json").is_file()
    a = load_file(local.adapter_dir / "adapter_model.safetensors")
    b = load_file(ray.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=RAY_TOL, rtol=0, msg=name)
    assert abs(ray.metrics["val/loss"] - local.metrics["val/loss"]) < 1e-4
