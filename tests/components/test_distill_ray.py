"""Distillation on Ray Train (2 CPU workers, gloo DDP), tracked in MLflow: the teacher is loaded on each
worker (the task travels without it), the student's KL to the teacher falls, MLflow holds the run."""

from __future__ import annotations

from pathlib import Path

import pytest
from _compress_data import one_thread, train_tiny_model

from lmforge.components.distill import DistillConfig, distill
from lmforge.config import build
from lmforge.model.checkpoint import read_config

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_distill_on_ray_with_mlflow(ray_local, tmp_path: Path) -> None:
    with one_thread():
        shards, teacher_dir = train_tiny_model(tmp_path, steps=40)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = build(
        DistillConfig,
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"preset": "tiny", "overrides": {"n_layers": 1}},
            "data": {"shards_dir": str(shards), "seq_len": 64, "global_batch_size": 8, "micro_batch_size": 2},
            "optim": {"lr": 3e-3},
            "schedule": {"max_steps": 12, "warmup_steps": 2},
            "checkpoint": {"every": 6},
            "eval": {"every": 12, "batches": 2},
            "tracking": {"enabled": True, "tracking_uri": uri, "log_every": 6},
            "ray": {"num_workers": 2},
            "distill": {"teacher": str(teacher_dir), "alpha": 0.9, "eval_batches": 4},
        },
    )
    result = distill(cfg)
    assert result.report["after"]["kl"] < 0.8 * result.report["before"]["kl"]
    assert read_config(result.model_dir).n_layers == 1
    assert (tmp_path / "run" / "checkpoints" / "step-00000012").is_dir()

    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.get_run(result.run.mlflow_run_id)
    assert (
        run.info.status == "FINISHED" and "train/loss" in run.data.metrics and "val/loss" in run.data.metrics
    )
    assert client.get_experiment(run.info.experiment_id).name == "lmforge-distill"
