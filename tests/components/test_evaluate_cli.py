"""`lmforge evaluate` end to end through the real entry point: outputs, MLflow (sqlite), gate, exit codes."""

from __future__ import annotations

import json
import os

import pytest
from _evaluate_data import DOCS, make_model, write_jsonl, write_suite

from lmforge.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("eval-models")
    return make_model(tokenizer_dir, root / "a", seed=0), make_model(tokenizer_dir, root / "b", seed=1)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return uri


def _run(*args: str) -> int:
    return main(["evaluate", *args])


@pytest.mark.slow
@pytest.mark.integration
def test_evaluate_writes_report_logs_mlflow_and_passes_the_gate(tmp_path, models, tracking, capsys):
    from mlflow import MlflowClient

    model, baseline = models
    suite = write_suite(tmp_path, extra="window: 16\nstride: 8")
    (tmp_path / "gate.yaml").write_text(
        "rules:\n  - {metric: heldout.bits_per_byte, max: 1000}\n  - {metric: pick.acc, min: 0}\n"
    )
    out = tmp_path / "out"
    code = _run(
        "--model", str(model), "--baseline", str(baseline), "--suite", str(suite), "--output", str(out),
        "--gate", str(tmp_path / "gate.yaml"), "--batch-size", "3", "--limit", "4",
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"heldout", "qa", "pick"}
    assert set(metrics["tasks"]["heldout"]) == {"perplexity", "bits_per_byte", "tokens", "bytes", "items"}
    assert set(metrics["tasks"]["qa"]) == {
        "rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "token_f1", "items",
    }  # fmt: skip
    assert set(metrics["tasks"]["pick"]) == {"acc", "acc_norm", "items"}
    assert metrics["tasks"]["heldout"]["items"] == 4
    assert metrics["tasks"]["heldout"]["bytes"] == sum(len(d.encode()) for d in DOCS[:4])
    assert metrics["model"] == str(model) and metrics["baseline"]["model"] == str(baseline)
    # two random models differ
    assert metrics["baseline"]["tasks"]["heldout"]["perplexity"] != metrics["tasks"]["heldout"]["perplexity"]
    assert metrics["gate"]["passed"] is True and metrics["gate"]["reasons"] == []
    assert metrics["cost"]["tasks"]["heldout"]["tokens_per_s"] > 0
    assert metrics["cost"]["tasks"]["qa"]["time_to_first_token_s"] > 0
    assert metrics["cost"]["peak_memory_mb"] > 0
    report = (out / "report.md").read_text()
    assert "| task | metric | model | baseline | delta |" in report and "**Gate: passed**" in report
    assert "| heldout | perplexity |" in report
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["task"] for s in samples] == ["qa"] * 4 + ["pick"] * 4
    assert set(samples[0]) >= {"prompt", "output", "reference", "scores"}
    assert samples[0]["prompt"] == f"Q: {DOCS[0][:24]}\nA:" and "\n" not in samples[0]["output"]
    for png in ("tasks.png", "perplexity_by_length.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("lmforge-evaluate")
    [run] = client.search_runs([exp.experiment_id])
    assert run.data.tags["gate"] == "passed"
    assert run.data.params["model"] == str(model) and run.data.params["batch_size"] == "3"
    assert run.data.metrics["heldout.perplexity"] == pytest.approx(metrics["tasks"]["heldout"]["perplexity"])
    assert "baseline.pick.acc" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "metrics.json", "report.md", "samples.jsonl", "tasks.png", "perplexity_by_length.png",
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.integration
def test_failed_gate_exits_3_and_tags_the_registered_version(tmp_path, models, tracking, capsys):
    from lmforge.registry import RegistryClient

    model, baseline = models
    registry = RegistryClient(tracking)
    registry.register_model_dir(model, "bot", alias="challenger")
    suite = write_suite(tmp_path)
    (tmp_path / "gate.yaml").write_text(
        "rules:\n  - {metric: heldout.bits_per_byte, max: 0.001}\n"
        "  - {metric: heldout.perplexity, max_regression: 0.0}\n"
    )
    code = _run(
        "--model", "models:/bot@challenger", "--suite", str(suite), "--output", str(tmp_path / "out"),
        "--gate", str(tmp_path / "gate.yaml"), "--baseline", str(model), "--limit", "2",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 3
    assert "gate: FAILED" in out and "is above the maximum 0.001" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # the same weights as the baseline: no regression, only the absolute bound fails
    assert metrics["gate"]["passed"] is False and len(metrics["gate"]["reasons"]) == 1
    assert metrics["model"] == "models:/bot@challenger (bot/1)"
    version = registry.client.get_model_version("bot", "1")
    assert version.tags["gate"] == "failed"
    assert float(version.tags["eval.heldout.bits_per_byte"]) == pytest.approx(
        metrics["tasks"]["heldout"]["bits_per_byte"], rel=1e-5
    )
    assert "**Gate: FAILED**" in (tmp_path / "out" / "report.md").read_text()
    from lmforge.registry import PromotionRefused  # the verdict gates `lmforge registry promote`

    with pytest.raises(PromotionRefused, match="failed its evaluation gate"):
        registry.promote("bot", 1, "champion")


@pytest.mark.slow
@pytest.mark.integration
def test_regression_against_a_worse_baseline_fails(tmp_path, models, tracking):
    model, baseline = models
    suite = write_suite(tmp_path)
    first = tmp_path / "first"
    assert _run("--model", str(model), "--suite", str(suite), "--output", str(first), "--limit", "3") == 0
    ppl = json.loads((first / "metrics.json").read_text())["tasks"]["heldout"]["perplexity"]
    second = tmp_path / "second"
    assert _run("--model", str(baseline), "--suite", str(suite), "--output", str(second), "--limit", "3") == 0
    other = json.loads((second / "metrics.json").read_text())["tasks"]["heldout"]["perplexity"]
    better, worse = (model, baseline) if ppl < other else (baseline, model)
    (tmp_path / "gate.yaml").write_text("rules:\n  - {metric: heldout.perplexity, max_regression: 0.0}\n")
    args = ["--suite", str(suite), "--gate", str(tmp_path / "gate.yaml"), "--limit", "3"]
    assert (
        _run("--model", str(worse), "--baseline", str(better), "--output", str(tmp_path / "o1"), *args) == 3
    )
    assert (
        _run("--model", str(better), "--baseline", str(worse), "--output", str(tmp_path / "o2"), *args) == 0
    )


def test_bad_input_is_one_line_exit_2_before_the_model_loads(tmp_path, models, tracking, capsys, monkeypatch):
    import lmforge.model.checkpoint as checkpoint

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(checkpoint, "load_model_dir", no_load)
    model, _ = models
    suite = write_suite(tmp_path)
    write_jsonl(tmp_path / "heldout.jsonl", [{"text": "fine"}, {"body": "no text field"}])
    code = _run("--model", str(model), "--suite", str(suite), "--output", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "task 'heldout': item" in err and "heldout.jsonl:2 has no field 'text'" in err

    write_suite(tmp_path)
    no_tokenizer = tmp_path / "no-tok"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model / name).read_bytes())
    code = _run("--model", str(no_tokenizer), "--suite", str(suite), "--output", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert code == 2 and "no tokenizer" in err and err.count("\n") == 1

    (tmp_path / "gate.yaml").write_text("rules:\n  - {metric: qa.acc, min: 1}\n")
    code = _run("--model", str(model), "--suite", str(suite), "--output", str(tmp_path / "o"), "--gate",
                str(tmp_path / "gate.yaml"))  # fmt: skip
    assert code == 2 and "not 'acc'" in capsys.readouterr().err
    code = _run("--model", str(model), "--suite", str(suite), "--output", str(tmp_path / "o"), "--device",
                "cuda:9")  # fmt: skip
    assert code == 2 and "--device cuda:9" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_decontamination_reports_and_filters(tmp_path, models, tracking):
    model, _ = models
    train = tmp_path / "train"
    train.mkdir()
    long_doc = " ".join(f"word{i}" for i in range(40))
    write_jsonl(train / "part-00000.jsonl", [{"text": long_doc}])
    write_jsonl(
        tmp_path / "docs.jsonl", [{"text": long_doc}, {"text": " ".join(f"other{i}" for i in range(40))}]
    )
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks:\n  - {name: heldout, type: perplexity, data: docs.jsonl}\n")
    out = tmp_path / "out"
    assert (
        _run("--model", str(model), "--suite", str(suite), "--output", str(out), "--train-data", str(train))
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["decontamination"]["tasks"]["heldout"]
    assert (report["items"], report["contaminated"]) == (2, 1)
    assert metrics["tasks"]["heldout"]["items"] == 2
    code = _run(
        "--model", str(model), "--suite", str(suite), "--output", str(out), "--train-data", str(train),
        "--set", "decontaminate=filter",
    )  # fmt: skip
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["tasks"]["heldout"]["items"] == 1


def test_the_flags_are_the_issues_contract():
    from lmforge.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["evaluate"]
    flags = {s for a in sub._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == {
        "--model", "--suite", "--output", "--baseline", "--gate", "--limit", "--batch-size", "--train-data",
        "--device", "--set",
    }  # fmt: skip
    assert {a.dest for a in sub._actions if a.required} == {"model", "suite", "output"}
