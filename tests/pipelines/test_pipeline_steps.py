"""Pipeline step functions called directly at tiny size (no kfp run): the quantize step calibrates
int4-awq / int4-gptq on the curated train split, and the evaluation stage's MLflow run is a nested
child of the pipeline's parent run (same experiment, `mlflow.parentRunId`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.pipelines import steps
from lmforge.pipelines.config import LifecycleConfig

TEXTS = [
    "Ledger entries are reconciled every night before the batch closes.",
    "The gasket on valve seven leaks when the pressure exceeds four bar.",
    "Support tickets about invoices go to the billing queue first.",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """A private MLflow store and a pipeline parent run (as the local runner opens one)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = steps.start_tracking("{}", "run-123", "lmforge")
    monkeypatch.setenv("LMFORGE_MLFLOW_PARENT_RUN", parent)
    return parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from lmforge.model.checkpoint import save_model_dir
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=400, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64
    )
    return save_model_dir(
        Transformer(cfg).eval(), tmp_path_factory.mktemp("m") / "model", tokenizer_dir=tokenizer_dir
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A curated dataset's layout: <data>/train/part-*.jsonl."""
    data = tmp_path_factory.mktemp("curated")
    (data / "train").mkdir()
    rows = "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS * 20))
    (data / "train" / "part-00000.jsonl").write_text(rows)
    return data


def config(*sets: str) -> str:
    from lmforge.config import apply_overrides, build, to_dict

    return json.dumps(to_dict(build(LifecycleConfig, apply_overrides({}, list(sets)))))


@pytest.mark.parametrize("method", ["int4-awq", "int4-gptq"])
def test_quantize_step_calibrates_on_the_curated_train_split(tracked, model_dir, data_dir, tmp_path, method):
    from mlflow import MlflowClient

    from lmforge.model.quantized import quantization_scheme

    cfg = config(
        f"quantize.method={method}",
        "quantize.group_size=32",
        "quantize.num_sequences=16",
        "quantize.seq_len=16",
        "quantize.min_sequences=8",
    )
    metrics, lineage = steps.quantize(
        cfg, str(model_dir), str(tmp_path / "q"), {"data_sha256": "d"}, str(data_dir)
    )
    assert lineage == {"data_sha256": "d", "quantization": method}
    assert metrics["calibration_sequences"] >= 8 and metrics["calibration_loss_after"] > 0
    assert quantization_scheme(tmp_path / "q") is not None
    (run,) = MlflowClient().search_runs(
        [MlflowClient().get_run(tracked).info.experiment_id], "tags.`lmforge.stage` = 'quantize'"
    )
    assert run.data.tags["mlflow.parentRunId"] == tracked
    assert run.data.metrics["calibration_sequences"] == metrics["calibration_sequences"]


def test_quantize_step_names_missing_calibration_data(tracked, model_dir, tmp_path):
    from lmforge.errors import UserError

    cfg = config("quantize.method=int4-awq", "quantize.group_size=32")
    with pytest.raises(UserError, match="calibration"):
        steps.quantize(cfg, str(model_dir), str(tmp_path / "q"), {})  # no curated data given
    with pytest.raises(UserError, match=r"calibration data .*train does not exist"):
        steps.quantize(cfg, str(model_dir), str(tmp_path / "q"), {}, str(tmp_path / "no-data"))
    with pytest.raises(Exception, match="quantize: seq_len must be an integer >= 2"):
        config("quantize.seq_len=1")


def test_evaluate_run_is_nested_under_the_pipeline_run(tracked, model_dir, data_dir, tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "suite.yaml").write_text(
        "tasks:\n  - {name: heldout, type: perplexity, data: heldout.jsonl, text: text}\n"
    )
    (tmp_path / "gate.yaml").write_text("rules:\n  - {metric: heldout.bits_per_byte, max: 1000.0}\n")
    cfg = config(f"evaluate.suite={tmp_path / 'suite.yaml'}", f"gate.rules={tmp_path / 'gate.yaml'}")
    metrics, lineage, passed = steps.evaluate(
        cfg,
        str(model_dir),
        str(data_dir),
        str(tmp_path / "eval"),
        str(tmp_path / "report.md"),
        {"data_sha256": "d"},
    )
    assert passed and metrics["gate_passed"] == 1.0 and lineage["gate_passed"] == "true"
    client = MlflowClient()
    parent = client.get_run(tracked)
    (run,) = client.search_runs([parent.info.experiment_id], "tags.`lmforge.stage` = 'evaluate'")
    assert run.info.experiment_id == parent.info.experiment_id  # not a run of its own experiment
    assert run.data.tags["mlflow.parentRunId"] == tracked and run.info.run_name == "evaluate"
    assert run.data.tags["lineage.data_sha256"] == "d" and run.data.tags["gate"] == "passed"
    assert "heldout.bits_per_byte" in run.data.metrics
    assert client.get_experiment_by_name("lmforge-evaluate") is None  # nothing logged beside it
