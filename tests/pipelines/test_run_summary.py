"""`lmforge run`'s closing summary: model output and user text printed literally, the tasks as a
labelled table, where everything is (the task artifacts, reused ones from the run that made them),
and the next steps (serve the registered model, then query it)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from lmforge.cli import main
from lmforge.cli.run import mlflow_ui_hint, print_summary
from lmforge.pipelines.local import LocalRun

RUN = "lmforge-2026-01-02-00-00-00-000000"


def _run(
    tmp_path: Path, completion: str, registered: str | None = "models:/lmforge-demo@champion"
) -> LocalRun:
    kfp = tmp_path / "work" / "kfp"
    (kfp / RUN / "quantize" / "quantized").mkdir(parents=True)
    earlier = kfp / "lmforge-2026-01-01-00-00-00-000000"  # curate was reused: its artifact is there
    (earlier / "curate").mkdir(parents=True)
    (earlier / "curate" / "datacard").write_text("# Datacard")
    return LocalRun(
        workdir=tmp_path / "work",
        run_dir=kfp / RUN,
        pipeline_run_id="local-x",
        mlflow_run_id="abc123",
        tracking_uri="sqlite:////abs/.lmforge/mlflow.db",
        steps={"curate": {"status": "reused"}, "pretrain": {"status": "ran", "seconds": 181.0}},
        seconds=200.0,
        registered=registered,
        version="3" if registered else None,
        samples=[{"prompt": "Paths like [red]", "completion": completion, "tokens": 9}],
        record_path=tmp_path / "[x]" / "run.json",
    )


def _render(run: LocalRun) -> str:
    out = io.StringIO()
    print_summary(run, Console(file=out, width=300, color_system=None))
    return out.getvalue()


def test_model_output_is_printed_literally(tmp_path: Path, monkeypatch) -> None:
    # "[/usr/lib]" used to raise a markup error (a traceback at the very end of a run); "[bold]"
    # used to vanish into styling.
    monkeypatch.chdir(tmp_path)
    text = _render(_run(tmp_path, " lives in [/usr/lib] and [bold]x[/bold]"))
    assert "Paths like [red] lives in [/usr/lib] and [bold]x[/bold]" in text
    assert "[x]/run.json" in text


def test_summary_has_a_task_table_locations_and_next_steps(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = _render(_run(tmp_path, " ok"))
    header = next(line for line in text.splitlines() if "task" in line and "this run" in line)
    assert "took" in header
    assert any("pretrain" in ln and "ran" in ln and "181.0 s" in ln for ln in text.splitlines())
    assert "1 of 2 tasks reused" in text
    assert "Samples from models:/lmforge-demo@champion" in text
    assert "work/kfp/lmforge-2026-01-01-00-00-00-000000/curate/datacard" in text  # from the run that made it
    assert f"work/kfp/{RUN}/quantize/quantized" in text
    assert "models:/lmforge-demo@champion = version 3" in text
    assert "mlflow ui --backend-store-uri sqlite:////abs/.lmforge/mlflow.db" in text and "abc123" in text
    assert "lmforge serve --model models:/lmforge-demo@champion" in text
    assert "curl http://127.0.0.1:8000/v1/completions" in text and '"model": "lmforge-demo"' in text
    assert 'completions.create(model="lmforge-demo"' in text


def test_next_steps_serve_the_model_directory_when_nothing_was_registered(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    text = _render(_run(tmp_path, " ok", registered=None))
    assert f"lmforge serve --model work/kfp/{RUN}/quantize/quantized" in text
    assert '"model": "model"' in text


def test_mlflow_hint_names_the_store_used() -> None:
    assert mlflow_ui_hint("http://mlflow:5000") == "open http://mlflow:5000 in a browser"
    assert mlflow_ui_hint("sqlite:////a b/mlflow.db").startswith(
        "mlflow ui --backend-store-uri 'sqlite:////a b/mlflow.db'"
    )


def test_resume_and_overwrite_exclude_each_other(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--resume", "--overwrite"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_kfp_flag_is_a_documented_no_op(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "deprecated, no effect" in " ".join(capsys.readouterr().out.split())
