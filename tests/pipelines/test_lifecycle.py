"""`lmforge run` end to end on a slice of the sample corpus: every stage for real (curation,
tokenizer, shards, pretraining, MLflow registry on sqlite, generation), a tiny model, a few steps."""

import json

import pytest

from lmforge.cli import main
from lmforge.config import load
from lmforge.model.config import ConfigError
from lmforge.pipelines.lifecycle import LifecycleConfig, run_lifecycle

pytestmark = pytest.mark.slow


def _config(repo_root, tmp_path, **extra):
    overrides = [
        f"workdir={tmp_path / 'work'}",
        f"inputs=[{repo_root / 'data/sample/python-docs/tutorial'}]",
        "tokenizer.vocab_size=600",
        "curate.split.validation=0.25",  # 17 documents: make sure validation gets some
        "pretrain.model.preset=tiny",
        "pretrain.data.seq_len=64",
        "pretrain.data.global_batch_size=4",
        "pretrain.data.micro_batch_size=4",
        "pretrain.schedule.max_steps=6",
        "pretrain.schedule.warmup_steps=2",
        "pretrain.checkpoint.every=3",
        "pretrain.eval.every=3",
        "pretrain.eval.batches=2",
        "pretrain.ray.num_workers=0",
        "generate.max_new_tokens=8",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load(LifecycleConfig, repo_root / "configs/demo.yaml", overrides)


def test_run_lifecycle_ends_with_a_registered_model_and_samples(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = run_lifecycle(_config(repo_root, tmp_path), log=lambda _: None)

    record = json.loads((result.workdir / "run.json").read_text())
    assert list(record) == ["curate", "tokenizer", "tokenize", "pretrain", "register", "generate"]
    assert record["curate"]["documents_kept"] > 0
    assert record["tokenize"]["train_tokens"] > 0
    assert (result.model_dir / "model.safetensors").is_file() and (
        result.model_dir / "tokenizer.json"
    ).is_file()
    assert result.registered == "models:/lmforge-demo@candidate"

    from mlflow import MlflowClient

    version = MlflowClient().get_model_version_by_alias("lmforge-demo", "candidate")
    assert str(version.version) == "1"
    assert len(result.samples) == 2 and all(s["tokens"] > 0 for s in result.samples)


def test_bad_lifecycle_config_fails_before_work(repo_root, tmp_path, capsys):
    with pytest.raises(ConfigError, match="pretrain.*max_steps"):
        _config(repo_root, tmp_path, **{"pretrain.schedule.max_steps": 0}).pretrain_config()
    code = main(["run", "--config", str(repo_root / "configs/demo.yaml"), "--set", "tokenizer.vocab_size=-1"])
    assert code == 2
    assert "tokenizer.vocab_size" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
