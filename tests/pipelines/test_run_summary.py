"""`lmforge run`'s closing summary: model output and user text printed literally, the steps as a
labelled table, where everything is, and the next steps (serve, then query)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from lmforge.cli import main
from lmforge.cli.run import mlflow_ui_hint, print_summary
from lmforge.pipelines.lifecycle import LifecycleResult


def _result(tmp_path: Path, completion: str, registered: str | None = "models:/lmforge-demo@candidate"):
    steps = {
        "curate": {"status": "reused", "seconds": 3.25, "documents_kept": 84, "documents_in": 97},
        "pretrain": {"status": "ran", "seconds": 181.0, "steps": 150, "val/loss": 4.1234},
        "generate": {"status": "ran", "seconds": 1.5, "samples": [{}]},
    }
    return LifecycleResult(
        workdir=tmp_path,
        record_path=tmp_path / "run.json",
        model_dir=tmp_path / "pretrain" / "model",
        registered=registered,
        samples=[{"prompt": "Paths like [red]", "completion": completion, "tokens": 9}],
        steps=steps,
        artifacts={"model": tmp_path / "pretrain" / "model", "run record": tmp_path / "[x]" / "run.json"},
        tracking_uris=["sqlite:////abs/.lmforge/mlflow.db"],
        seconds=200.0,
    )


def _render(result) -> str:
    out = io.StringIO()
    print_summary(result, Console(file=out, width=300, color_system=None))
    return out.getvalue()


def test_model_output_is_printed_literally(tmp_path: Path) -> None:
    # "[/usr/lib]" used to raise a markup error (a traceback at the very end of a run); "[bold]"
    # used to vanish into styling.
    text = _render(_result(tmp_path, " lives in [/usr/lib] and [bold]x[/bold]"))
    assert "Paths like [red] lives in [/usr/lib] and [bold]x[/bold]" in text
    assert str(tmp_path / "[x]" / "run.json") in text


def test_summary_has_a_step_table_locations_and_next_steps(tmp_path: Path) -> None:
    text = _render(_result(tmp_path, " ok"))
    header = next(line for line in text.splitlines() if "step" in line and "this run" in line)
    assert "took" in header and "result" in header
    assert any(
        "curate" in ln and "reused" in ln and "3.2 s" in ln and "84 of 97" in ln for ln in text.splitlines()
    )
    assert any("pretrain" in ln and "ran" in ln and "validation loss 4.123" in ln for ln in text.splitlines())
    assert "1 of 3 steps reused" in text
    assert "mlflow ui --backend-store-uri sqlite:////abs/.lmforge/mlflow.db" in text
    assert "lmforge serve --model models:/lmforge-demo@candidate" in text
    assert "curl http://127.0.0.1:8000/v1/completions" in text and '"model": "lmforge-demo"' in text
    assert 'completions.create(model="lmforge-demo"' in text


def test_next_steps_serve_the_model_directory_when_nothing_was_registered(tmp_path: Path) -> None:
    text = _render(_result(tmp_path, " ok", registered=None))
    assert f"lmforge serve --model {tmp_path / 'pretrain' / 'model'}" in text
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
