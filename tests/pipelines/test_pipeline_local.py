"""`lmforge run` end to end: the Kubeflow pipeline on this machine through kfp.local (the same
@dsl.pipeline the cluster runs), every stage for real on a slice of the sample corpus with a tiny
model: curation, tokenizer, shards, pretraining, LoRA fine-tuning, int8 quantization, evaluation
with a gate, registration and promotion in MLflow on sqlite. Asserts the artifacts, the nested
MLflow runs, lineage tags, aliases, the run record and the samples; then runs again with a gate the
model fails (the unchanged tasks are reused from kfp.local's cache, the new version is not
promoted), and finally serves models:/lmforge-demo@champion with `lmforge serve` (a real server:
Ray Serve, HTTP) and asks it for a completion. A failing stage surfaces its name and its error.

Slow (several minutes on 2 cores: every task is a fresh Python process importing torch):
    .venv/bin/python -m pytest tests/pipelines/test_pipeline_local.py -m slow
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from _net import free_port, wait_http

from lmforge.cli import main
from lmforge.config import load
from lmforge.pipelines.config import LifecycleConfig
from lmforge.pipelines.local import StageFailed, run_pipeline_locally

pytestmark = pytest.mark.slow
UPSTREAM = ["resolve-config", "curate", "train-tokenizer", "tokenize", "pretrain", "finetune", "quantize"]


def _overrides(repo_root, tmp_path, *extra: str) -> list[str]:
    finetune = [  # the bundled instruction task, a few short steps
        f"data.train={repo_root / 'data/finetune/train.jsonl'}",
        f"data.validation={repo_root / 'data/finetune/heldout.jsonl'}",
        "max_seq_len=192",  # most examples fit with the 600-id tokenizer (the tiny model holds 256)
        "data.global_batch_size=4",
        "data.micro_batch_size=4",
        "schedule.max_steps=2",
        "schedule.warmup_steps=1",
        "checkpoint.every=2",
        "eval.every=2",
        "eval.batches=1",
    ]
    return [
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
        "finetune.enabled=true",
        f"finetune.config={repo_root / 'configs/finetune-demo.yaml'}",
        f"finetune.overrides=[{', '.join(finetune)}]",
        "quantize.method=int8",
        f"evaluate.suite={tmp_path / 'suite.yaml'}",
        "evaluate.batch_size=2",
        f"gate.rules={tmp_path / 'gate-pass.yaml'}",
        "generate.max_new_tokens=8",
        *extra,
    ]


def _config(repo_root, tmp_path, *extra: str) -> LifecycleConfig:
    return load(LifecycleConfig, repo_root / "configs/demo.yaml", _overrides(repo_root, tmp_path, *extra))


def _run(repo_root, tmp_path, *extra: str) -> None:
    argv = ["run", "--config", str(repo_root / "configs/demo.yaml")]
    for item in _overrides(repo_root, tmp_path, *extra):
        argv += ["--set", item]
    assert main(argv) == 0


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
    monkeypatch.setenv("LMFORGE_MODEL_CACHE", str(tmp_path / "model-cache"))  # samples and serve fetch here
    _write_suite(tmp_path)
    return tmp_path


def test_lmforge_run_runs_every_stage_tracks_lineage_promotes_through_the_gate_and_serves(
    repo_root, isolated, capsys
):
    from mlflow import MlflowClient

    tmp_path = isolated
    _run(repo_root, tmp_path)
    out = capsys.readouterr().out
    assert "lmforge run: pretrain ..." in out and "lmforge run: finetune ..." in out  # progress per stage
    assert "lmforge serve --model models:/lmforge-demo@champion" in out  # the summary's next step
    record = json.loads((tmp_path / "work" / "run.json").read_text())
    assert record["status"] == "succeeded" and not (tmp_path / "work" / "run.partial.json").exists()
    assert {k: v["status"] for k, v in record["steps"].items()} == dict.fromkeys(
        [*UPSTREAM, "evaluate", "register", "promote", "deploy"], "ran"
    )
    assert record["registered"] == "models:/lmforge-demo@champion" and record["registered_version"] == "1"
    assert len(record["samples"]) == 2 and all(s["tokens"] > 0 for s in record["samples"])
    assert f"Samples from {record['registered']}" in out and record["samples"][0]["prompt"] in out

    run_dir = Path(record["run_dir"])
    model = run_dir / "quantize" / "quantized"
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    assert "quantization_config" in json.loads((model / "config.json").read_text())
    assert (run_dir / "finetune" / "tuned" / "model.safetensors").is_file()
    assert "documents" in (run_dir / "curate" / "datacard").read_text().lower()
    assert (run_dir / "evaluate" / "report").is_file() and (run_dir / "deploy" / "note").is_file()
    assert (tmp_path / "work" / "pipeline.log").stat().st_size > 0
    assert list((tmp_path / "work" / "pretrain").glob("*/checkpoints"))  # kept for --resume

    client = MlflowClient()
    parent = client.get_run(record["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.schedule.max_steps"] == "4"
    nested = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{record['mlflow_run_id']}'"
    )
    stages = {r.data.tags["lmforge.stage"] for r in nested}
    expected = {"curate", "tokenizer", "tokenize", "pretrain", "finetune", "quantize", "evaluate"}
    assert expected | {"register", "promote", "deploy"} <= stages
    data_hash = json.loads((run_dir / "curate" / "data" / "datacard.json").read_text())["content_sha256"]
    assert all(r.data.tags["lmforge.pipeline_run_id"] == record["pipeline_run_id"] for r in nested)

    versions = {str(v.version): v for v in client.search_model_versions("name='lmforge-demo'")}
    tags = versions["1"].tags
    assert tags["lineage.data_sha256"] == data_hash
    assert len(tags["lineage.tokenizer_sha256"]) == 64 and tags["lineage.base_model"].startswith("none")
    assert tags["lineage.finetune"].startswith("lora") and tags["lineage.quantization"] == "int8"
    assert tags["lmforge.pipeline_run_id"] == record["pipeline_run_id"] and tags["lmforge.code_version"]
    assert tags["lineage.gate_passed"] == "true" and tags["gate"] == "passed"
    assert tags["data_hash"] == data_hash and tags["pipeline_run_id"] == record["pipeline_run_id"]
    assert _aliases(client) == {"candidate": "1", "champion": "1"}

    # The gate changed to one the model fails: the stages before evaluation are reused, the new
    # version is registered as the candidate but champion stays where it was.
    _run(repo_root, tmp_path, f"gate.rules={tmp_path / 'gate-fail.yaml'}")
    out = capsys.readouterr().out
    again = json.loads((tmp_path / "work" / "run.json").read_text())
    # (resolve-config reads the whole config, so it runs; the sections the others read are unchanged)
    assert {k: v["status"] for k, v in again["steps"].items()} == {
        "resolve-config": "ran",
        **dict.fromkeys(UPSTREAM[1:], "reused"),
        "evaluate": "ran",
        "register": "ran",
    }
    assert _aliases(client) == {"candidate": "2", "champion": "1"}
    assert client.get_model_version("lmforge-demo", "2").tags["gate"] == "failed"
    assert again["registered"] == "models:/lmforge-demo@candidate"  # the samples: this run's model
    assert "6 of 9 tasks reused" in out

    # What the summary says to do next: serve the promoted model, and it answers over HTTP.
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": f"/tmp/lmf-e2e-{os.getpid()}-{port}", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", "models:/lmforge-demo@champion"]
    cmd += ["--port", str(port), "--log-file", str(tmp_path / "serve.log")]
    with open(tmp_path / "serve.out", "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", server, timeout=300)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "lmforge-demo", "prompt": "The Python tutorial", "max_tokens": 4},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert (
            reply.json()["choices"][0]["text"] is not None and reply.json()["usage"]["completion_tokens"] > 0
        )
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # lets Serve and Ray stop (the server's own group)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


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
