"""The Kubeflow pipeline end to end on this machine through kfp.local (the same @dsl.pipeline the
cluster runs): every stage for real on a slice of the sample corpus with a tiny model (curation,
tokenizer, shards, pretraining, the finetune/quantize tasks passing the model through, evaluation
with a gate, MLflow on sqlite), asserting artifacts, the nested MLflow runs, lineage tags and
aliases; then again with a gate the model fails: the unchanged steps are reused from kfp.local's
cache and the new version is not promoted. A failing stage surfaces its name and its error.

Slow (several minutes on 2 cores: every task is a fresh Python process importing torch):
    .venv/bin/python -m pytest tests/pipelines/test_pipeline_local.py -m slow
"""

from __future__ import annotations

import json

import pytest

from lmforge.config import load
from lmforge.pipelines.config import LifecycleConfig
from lmforge.pipelines.local import StageFailed, run_pipeline_locally

pytestmark = pytest.mark.slow
UPSTREAM = ["resolve-config", "curate", "train-tokenizer", "tokenize", "pretrain", "finetune", "quantize"]


def _config(repo_root, tmp_path, *extra: str) -> LifecycleConfig:
    overrides = [
        f"workdir={tmp_path / 'work'}",
        f"inputs=[{repo_root / 'data/sample/python-docs/tutorial'}]",
        "tokenizer.vocab_size=600",
        "curate.split.validation=0.25",
        "pretrain.model.preset=tiny",
        "pretrain.data.seq_len=64",
        "pretrain.data.global_batch_size=4",
        "pretrain.data.micro_batch_size=4",
        "pretrain.schedule.max_steps=4",
        "pretrain.schedule.warmup_steps=1",
        "pretrain.checkpoint.every=4",
        "pretrain.eval.every=0",
        "pretrain.ray.num_workers=0",
        f"evaluate.suite={tmp_path / 'suite.yaml'}",
        "evaluate.batch_size=2",
        f"gate.rules={tmp_path / 'gate-pass.yaml'}",
        *extra,
    ]
    return load(LifecycleConfig, repo_root / "configs/demo.yaml", overrides)


def _write_suite(tmp_path) -> None:
    lines = [
        "Ledger entries are reconciled every night before the batch closes.",
        "The gasket on valve seven leaks when the pressure exceeds four bar.",
        "Support tickets about invoices go to the billing queue first.",
    ]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (tmp_path / "suite.yaml").write_text(
        "tasks:\n  - {name: heldout, type: perplexity, data: heldout.jsonl, text: text}\n"
    )
    (tmp_path / "gate-pass.yaml").write_text(
        "rules:\n  - {metric: heldout.bits_per_byte, max: 1000.0}\n"
        "  - {metric: heldout.bits_per_byte, max_regression: 0.5}\n"  # skipped: no champion yet
    )
    (tmp_path / "gate-fail.yaml").write_text("rules:\n  - {metric: heldout.bits_per_byte, max: 0.0001}\n")


def _aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model("lmforge-demo").aliases.items()}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _write_suite(tmp_path)
    return tmp_path


def test_pipeline_runs_every_stage_tracks_lineage_and_promotes_only_through_the_gate(repo_root, isolated):
    from mlflow import MlflowClient

    tmp_path, said = isolated, []
    run = run_pipeline_locally(_config(repo_root, tmp_path), log=said.append)
    assert {k: v["status"] for k, v in run.steps.items()} == dict.fromkeys(
        [*UPSTREAM, "evaluate", "register", "promote", "deploy"], "ran"
    )
    assert any(line == "lmforge run: pretrain ..." for line in said)
    model = run.artifact("quantize", "quantized")
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    assert "documents" in run.artifact("curate", "datacard").read_text().lower()
    assert run.artifact("evaluate", "report").is_file() and run.artifact("deploy", "note").is_file()
    assert (run.workdir / "pipeline.log").stat().st_size > 0

    client = MlflowClient()
    parent = client.get_run(run.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.schedule.max_steps"] == "4"
    nested = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.mlflow_run_id}'"
    )
    stages = {r.data.tags["lmforge.stage"] for r in nested}
    assert {"curate", "tokenizer", "tokenize", "pretrain", "register", "promote", "deploy"} <= stages
    data_hash = json.loads((run.artifact("curate", "data") / "datacard.json").read_text())["content_sha256"]
    assert all(r.data.tags["lmforge.pipeline_run_id"] == run.pipeline_run_id for r in nested)

    versions = {str(v.version): v for v in client.search_model_versions("name='lmforge-demo'")}
    tags = versions["1"].tags
    assert tags["lineage.data_sha256"] == data_hash
    assert len(tags["lineage.tokenizer_sha256"]) == 64 and tags["lineage.base_model"].startswith("none")
    assert tags["lmforge.pipeline_run_id"] == run.pipeline_run_id and tags["lmforge.code_version"]
    assert tags["lineage.gate_passed"] == "true" and tags["gate"] == "passed"
    assert tags["data_hash"] == data_hash and tags["pipeline_run_id"] == run.pipeline_run_id
    assert _aliases(client) == {"candidate": "1", "champion": "1"}

    # The gate changed to one the model fails: the stages before evaluation are reused, the new
    # version is registered as the candidate but champion stays where it was.
    again = run_pipeline_locally(
        _config(repo_root, tmp_path, f"gate.rules={tmp_path / 'gate-fail.yaml'}"), log=lambda _: None
    )
    statuses = {k: v["status"] for k, v in again.steps.items()}
    # (resolve-config reads the whole config, so it runs; the sections the others read are unchanged)
    assert statuses == {
        "resolve-config": "ran",
        **dict.fromkeys(UPSTREAM[1:], "reused"),
        "evaluate": "ran",
        "register": "ran",
    }
    assert _aliases(client) == {"candidate": "2", "champion": "1"}
    assert client.get_model_version("lmforge-demo", "2").tags["gate"] == "failed"


def test_failing_stage_names_itself_and_its_error(repo_root, isolated):
    from mlflow import MlflowClient

    tmp_path = isolated
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "note.txt").write_text("too short")
    cfg = _config(repo_root, tmp_path, f"inputs=[{tmp_path / 'bad'}]")
    with pytest.raises(StageFailed, match=r"pipeline stage '[\w-]+' failed: \w+: ") as failed:
        run_pipeline_locally(cfg, log=lambda _: None)
    assert "'train-tokenizer'" in str(failed.value) or "'curate'" in str(failed.value)
    client = MlflowClient()
    exp = client.get_experiment_by_name("lmforge-pipeline")
    parents = client.search_runs([exp.experiment_id], "tags.`lmforge.pipeline_run_id` LIKE 'local-%'")
    assert any(r.info.status == "FAILED" and "mlflow.parentRunId" not in r.data.tags for r in parents)
