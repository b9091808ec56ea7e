"""`lmforge run`: the Kubeflow pipeline on this machine (kfp.local, local Ray, MLflow on sqlite).

One code path: the same `@dsl.pipeline` the cluster runs (`pipelines/pipeline.py`), run through
`pipelines/local.py`. Re-runnable: tasks whose inputs are unchanged are reused from kfp.local's
cache; `--overwrite` runs everything afresh, `--resume` continues an interrupted pretraining.
The summary at the end says where everything is and what to do next. Model output and user text
are printed literally (rich `Text`, never console markup: `[/usr/lib]` is text, not a closing tag).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmforge.cli._args import add_config_args
from lmforge.registry import parse_model_uri


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="run the whole pipeline locally: curate, tokenizer, tokenize, pretrain, finetune, quantize, "
        "evaluate, register, promote",
        description="Run the Kubeflow pipeline (`lmforge pipeline compile` writes the same one) on this "
        "machine through kfp.local: every stage as a subprocess of this Python, local Ray for training, "
        "MLflow on sqlite (one parent run, a nested run per stage), the model registered as "
        "models:/NAME@candidate and promoted to @champion when the gate passes; sample generations and "
        "a summary at the end. Outputs go under the config's workdir (task artifacts in <workdir>/kfp/, "
        "full log in <workdir>/pipeline.log). Run it again and unchanged tasks are reused (kfp.local's "
        "cache); a changed config section re-runs its task and the ones after it. <workdir>/run.json "
        "records the last successful run; <workdir>/run.partial.json the one in progress or the last "
        "that failed.",
    )
    add_config_args(
        parser,
        example="pretrain.schedule.max_steps=50",
        config_help="run YAML (e.g. configs/demo.yaml); default: built-in defaults",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted pretraining (same config and data) from its newest checkpoint in "
        "<workdir>/pretrain/",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="run every task afresh, reusing nothing from earlier runs (the task cache and the "
        "pretraining checkpoints)",
    )
    parser.add_argument(
        "--kfp",
        action="store_true",
        help="deprecated, no effect: `lmforge run` always runs the Kubeflow pipeline through kfp.local",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print every task's full log (always in pipeline.log)"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmforge.config import load
    from lmforge.pipelines.config import LifecycleConfig
    from lmforge.pipelines.local import run_pipeline_locally

    # bound to the real stdout now: while the pipeline runs, sys.stdout is kfp.local's output
    # (to pipeline.log), and the progress lines must still reach the terminal
    console = Console(file=sys.stdout)
    cfg = load(LifecycleConfig, args.config, args.overrides)
    run = run_pipeline_locally(
        cfg,
        log=lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True),
        resume=args.resume,
        overwrite=args.overwrite,
        verbose=args.verbose,
    )
    print_summary(run, console)
    return 0


# ---- the summary --------------------------------------------------------------------------------
def print_summary(run, console: Console) -> None:
    """What happened (a table of the tasks), the samples, where everything is, and what to do next."""
    console.rule(Text(f"lmforge run finished in {run.seconds:.1f} s"))
    table = Table(title="Tasks", title_justify="left", show_edge=False, pad_edge=False)
    for column in ("task", "this run", "took"):
        table.add_column(column, justify="right" if column == "took" else "left")
    for name, entry in run.steps.items():
        seconds = entry.get("seconds")
        took = f"{seconds:.1f} s" if isinstance(seconds, (int, float)) else "-"
        table.add_row(Text(name), Text(str(entry.get("status", "?"))), Text(took))
    console.print(table)
    reused = sum(1 for s in run.steps.values() if s.get("status") == "reused")
    if reused:
        console.print(
            Text(
                f"{reused} of {len(run.steps)} tasks reused: their inputs are unchanged since they ran "
                "(kfp.local's cache). Pass --overwrite to run them all again."
            ),
            highlight=False,
        )

    if run.samples:
        console.print(Text(f"\nSamples from {run.registered} (prompt in bold, then the completion)", "bold"))
    for sample in run.samples:  # continuation lines indented under the first
        text = Text.assemble("  ", (sample["prompt"], "bold"), sample["completion"])
        console.print(Text("\n    ").join(text.split("\n", allow_blank=True)), highlight=False)

    console.print(Text("\nWhere everything is", style="bold"))
    places = {
        "model": run.artifact("quantize", "quantized"),
        "datacard": run.artifact("curate", "datacard"),
        "fertility report": run.artifact("train-tokenizer", "report"),
        "loss curve": run.artifact("pretrain", "loss_curve"),
        "evaluation report": run.artifact("evaluate", "report"),
        "task folders": run.run_dir,
        "full log": run.workdir / "pipeline.log",
        "run record": run.record_path,
    }
    for label, path in places.items():
        if path is not None:
            console.print(Text(f"  {label + ':':<20}{_show(path)}"), highlight=False, soft_wrap=True)
    if run.registered:
        console.print(Text(f"  {'registered:':<20}{run.registered} = version {run.version}"))
    console.print(
        Text(f"  {'MLflow:':<20}{mlflow_ui_hint(run.tracking_uri)}"), highlight=False, soft_wrap=True
    )
    console.print(Text(f"  {'MLflow parent run:':<20}{run.mlflow_run_id}"), highlight=False)

    console.print(Text("\nNext steps", style="bold"))
    model = run.registered or _show(places["model"] or run.run_dir)
    for line in next_steps(model, run.registered, run.samples):  # soft-wrapped: one line to copy
        console.print(Text(f"  {line}"), highlight=False, soft_wrap=True)


def mlflow_ui_hint(tracking_uri: str) -> str:
    """How to look at an MLflow store: a server is opened in a browser, anything else via `mlflow ui`."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}  (then open http://127.0.0.1:5000)"


def next_steps(model: str, registered: str | None, samples: list[dict]) -> list[str]:
    """Serve the model, then query it with curl or the OpenAI client."""
    model_id = parse_model_uri(registered).name if registered else "model"
    prompt = samples[0]["prompt"] if samples else "Hello"
    body = json.dumps({"model": model_id, "prompt": prompt, "max_tokens": 32})
    return [
        f"serve it:         lmforge serve --model {shlex.quote(model)}",
        "query it:         curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' "
        f"-d {shlex.quote(body)}",
        "or from Python:   from openai import OpenAI; "
        'OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none").completions.create('
        f"model={json.dumps(model_id)}, prompt={json.dumps(prompt)}, max_tokens=32)",
        "run it again:     unchanged tasks are reused; --overwrite starts afresh, --resume continues an "
        "interrupted pretraining",
    ]


def _show(path: Path | str) -> str:
    """A path relative to the current directory when it is below it (shorter to read and to copy)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
