"""Pretraining on Ray Train with 2 CPU workers (gloo): the real distributed paths.

Ray runs are expensive here (a 2-worker group takes 16-33 s to start on 2 cores), so each run
checks several things:
  1. DDP, stopped by SIGTERM to the driver (the workers checkpoint and return), then resumed with
     --resume auto while a worker process is SIGKILLed mid-run (FailureConfig restarts the group
     from the newest checkpoint). The result equals an in-process run of the same config (the
     global batch order does not depend on the worker count), the loss went down, MLflow holds one
     run with params, metrics, config, loss curve and model, and transformers loads the model.
  2. DeepSpeed ZeRO-2 and 3. FSDP: a few steps; every rank's shards land in one checkpoint, which
     consolidates to the same weights as the in-process reference.
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from _pretrain_data import REPO, build_sample_shards, tiny_config

from lmforge.components.pretrain import checkpointing, consolidate, pretrain
from lmforge.model import load_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RAY_TOL = 2e-5  # 2-worker gloo all-reduce vs. one process: same math, different summation order


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_sample_shards(tmp_path_factory.mktemp("pretrain-ray-data"))


def close_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_model_dir(a).state_dict(), load_model_dir(b).state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


def test_ddp_preemption_resume_and_worker_kill(ray_local, shards: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [
        "schedule.max_steps=12",
        "schedule.warmup_steps=2",
        "checkpoint.every=2",
        "checkpoint.keep_last=3",
        "eval.every=6",
        "model.overrides.n_layers=2",
        "tracking.enabled=true",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=ray-test",
    ]
    reference = pretrain(tiny_config(shards, tmp_path / "local", *sets, "tracking.enabled=false"))

    cfg = tiny_config(shards, tmp_path / "ray", *sets, "ray.num_workers=2", "ray.max_failures=1")
    driver = os.getpid()
    marker = tmp_path / "killed-once"

    def preempt_driver_at_2(step: int, rank: int) -> None:
        if rank == 0 and step == 2:
            os.kill(driver, signal.SIGTERM)  # what a scheduler does to the job's driver

    first = pretrain(cfg, on_step=preempt_driver_at_2)
    assert first.preempted and 2 <= first.step < 8 and first.model_dir is None
    assert (
        first.checkpoint_dir is not None
        and checkpointing.read_state(first.checkpoint_dir)["step"] == first.step
    )

    def kill_rank1_at_9(step: int, rank: int) -> None:
        if rank == 1 and step == 9 and not marker.exists():  # after the step-8 checkpoint
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies; no Python cleanup

    second = pretrain(cfg, resume="auto", on_step=kill_rank1_at_9)
    assert marker.exists(), "the worker was never killed"
    assert not second.preempted and second.step == 12 and second.model_dir is not None
    close_weights(reference.model_dir, second.model_dir, RAY_TOL)

    # Every rank wrote its part into one checkpoint directory; Ray kept the last 3.
    state = checkpointing.read_state(second.checkpoint_dir)
    assert (
        state["world_size"] == 2
        and set(state["files"]) == {"0", "1"}
        and "rng/rank-1.pt" in state["files"]["1"]
    )
    kept = checkpointing.list_checkpoints(tmp_path / "ray" / "checkpoints")
    assert [p.name for p in kept] == ["step-00000008", "step-00000010", "step-00000012"]

    # One MLflow run across preemption, resume and restart; the killed step was trained twice.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert second.mlflow_run_id == first.mlflow_run_id
    run = client.get_run(second.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["ray.num_workers"] == "2"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sum(m.step == 9 for m in losses) == 2  # logged before the kill, and again after the restart
    by_step = {m.step: m.value for m in losses}
    assert sorted(by_step) == list(range(1, 13))
    # the loss went down: from ln(512) = 6.24 (uniform) towards the sample's token frequencies
    assert by_step[12] < by_step[1] - 0.4 and run.data.metrics["val/loss"] < math.log(512) - 0.4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss_curve.png", "model"} <= artifacts

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(second.model_dir).eval()
    ours = load_model_dir(second.model_dir)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def reference_3_steps(shards: Path, tmp_path_factory) -> Path:
    """In-process DDP reference for the sharded strategies."""
    out = tmp_path_factory.mktemp("ref")
    return pretrain(
        tiny_config(shards, out, "schedule.max_steps=3", "eval.every=0", "checkpoint.every=3")
    ).model_dir


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install 'lmforge[deepspeed]')",
)
def test_deepspeed_zero2_on_two_workers(
    ray_local, shards: Path, reference_3_steps: Path, tmp_path: Path
) -> None:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))  # built once, reused
    result = pretrain(
        tiny_config(
            shards,
            tmp_path / "ds",
            "ray.num_workers=2",
            "strategy.name=deepspeed",
            "strategy.zero_stage=2",
            "schedule.max_steps=3",
            "eval.every=0",
            "checkpoint.every=3",
        )
    )
    state = checkpointing.read_state(result.checkpoint_dir)
    shards_per_rank = [[f for f in state["files"][r] if "optim_states" in f] for r in ("0", "1")]
    assert all(len(files) == 1 for files in shards_per_rank)  # each rank saved its own ZeRO partition
    close_weights(reference_3_steps, result.model_dir, RAY_TOL)
    again = consolidate(result.checkpoint_dir, tmp_path / "again")
    close_weights(result.model_dir, again, 0.0)


def test_fsdp_on_two_workers(ray_local, shards: Path, reference_3_steps: Path, tmp_path: Path) -> None:
    result = pretrain(
        tiny_config(
            shards,
            tmp_path / "fsdp",
            "ray.num_workers=2",
            "strategy.name=fsdp",
            "schedule.max_steps=3",
            "eval.every=0",
            "checkpoint.every=3",
        )
    )
    state = checkpointing.read_state(result.checkpoint_dir)
    assert "fsdp/__0_0.distcp" in state["files"]["0"] and "fsdp/__1_0.distcp" in state["files"]["1"]
    close_weights(reference_3_steps, result.model_dir, RAY_TOL)
