"""`lmforge run`: the whole lifecycle on this machine with embedded defaults (no services needed).

Re-runnable: steps whose config and inputs are unchanged since an earlier run are reused (and shown
as such); `--overwrite` runs everything afresh, `--resume` continues an interrupted pretraining.
The summary at the end says where everything is and what to do next. Model output and user text
are printed literally (rich `Text`, never console markup: `[/usr/lib]` is text, not a closing tag).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmforge.cli._args import add_config_args
from lmforge.registry import parse_model_uri


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="run the whole lifecycle locally: curate, tokenizer, tokenize, pretrain, register, generate",
        description="Run every stage in order on this machine (local folders, MLflow on sqlite, local Ray), "
        "ending with a registered model and sample generations. Outputs go under the config's workdir. "
        "Run it again and the steps whose config and inputs are unchanged (content hashes) are reused; a "
        "changed step and the steps after it run again. <workdir>/run.json records the last successful "
        "run; <workdir>/run.partial.json the one in progress or the last that failed.",
    )
    add_config_args(
        parser,
        example="pretrain.schedule.max_steps=50",
        config_help="lifecycle YAML (e.g. configs/demo.yaml); default: built-in defaults",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted pretraining from its newest checkpoint (same config and data)",
    )
    mode.add_argument(
        "--overwrite", action="store_true", help="run every step afresh, reusing nothing from earlier runs"
    )
    parser.add_argument(
        "--kfp",
        action="store_true",
        help="run the Kubeflow pipeline (`lmforge pipeline`) through kfp.local: every stage of the config, "
        "including finetune, quantize, evaluate and gated promotion, one MLflow parent run with a nested run "
        "per stage; artifacts under <workdir>/kfp/ (--resume is not supported there)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="with --kfp: print every task's full log (always in pipeline.log)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmforge.config import load
    from lmforge.pipelines.lifecycle import LifecycleConfig, run_lifecycle

    console = Console()
    cfg = load(LifecycleConfig, args.config, args.overrides)
    if args.kfp:
        return _run_kfp(cfg, args, console)
    result = run_lifecycle(
        cfg,
        log=lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True),
        resume=args.resume,
        overwrite=args.overwrite,
    )
    print_summary(result, console)
    return 0


def _run_kfp(cfg, args: argparse.Namespace, console: Console) -> int:
    from lmforge.errors import UserError
    from lmforge.pipelines.local import run_pipeline_locally

    if args.resume:
        raise UserError("--resume is not supported with --kfp: run again (unchanged steps are reused)")
    run = run_pipeline_locally(
        cfg,
        log=lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True),
        overwrite=args.overwrite,
        verbose=args.verbose,
    )
    print_pipeline_summary(run, cfg, console)
    return 0


def print_pipeline_summary(run, cfg, console: Console) -> None:
    """The tasks, where the model, reports and MLflow are, and the command to serve the result."""
    from lmforge.registry import RegistryClient, RegistryError

    console.rule(Text(f"lmforge pipeline run finished in {run.seconds:.1f} s"))
    table = Table(title="Tasks", title_justify="left", show_edge=False, pad_edge=False)
    for column in ("task", "this run", "took"):
        table.add_column(column, justify="right" if column == "took" else "left")
    for name, entry in run.steps.items():
        seconds = entry.get("seconds")
        took = f"{seconds:.1f} s" if isinstance(seconds, (int, float)) else "-"
        table.add_row(Text(name), Text(str(entry.get("status", "?"))), Text(took))
    console.print(table)
    name = cfg.register.model_name
    try:
        aliases = RegistryClient(run.tracking_uri).aliases(name)
    except RegistryError:
        aliases = {}
    alias = cfg.gate.promote_alias if cfg.gate.promote_alias in aliases else cfg.register.alias
    console.print(Text("\nWhere everything is", style="bold"))
    places = {
        "model": run.artifact("quantize", "quantized"),
        "datacard": run.artifact("curate", "datacard"),
        "fertility report": run.artifact("train-tokenizer", "report"),
        "evaluation report": run.artifact("evaluate", "report"),
        "task folders": run.run_dir,
        "full log": run.workdir / "pipeline.log",
    }
    for label, path in places.items():
        if path is not None:
            console.print(Text(f"  {label + ':':<20}{_show(path)}"), highlight=False)
    if alias in aliases:
        console.print(Text(f"  {'registered:':<20}models:/{name}@{alias} = version {aliases[alias]}"))
    console.print(
        Text(f"  {'MLflow:':<20}{mlflow_ui_hint(run.tracking_uri)}"), highlight=False, soft_wrap=True
    )
    console.print(Text(f"  {'MLflow parent run:':<20}{run.mlflow_run_id}"), highlight=False)
    console.print(Text("\nNext steps", style="bold"))
    model = f"models:/{name}@{alias}" if alias in aliases else _show(places["model"] or run.run_dir)
    console.print(Text(f"  serve it:         lmforge serve --model {shlex.quote(model)}"), soft_wrap=True)
    console.print(
        Text("  run it again:     unchanged tasks are reused (kfp.local cache); --overwrite runs all"),
        soft_wrap=True,
    )


# ---- the summary --------------------------------------------------------------------------------
def print_summary(result, console: Console) -> None:
    """What happened (a table of the steps), the samples, where everything is, and what to do next."""
    console.rule(Text(f"lmforge run finished in {result.seconds:.1f} s"))
    console.print(_steps_table(result.steps))
    reused = sum(1 for s in result.steps.values() if s.get("status") == "reused")
    if reused:
        console.print(
            Text(
                f"{reused} of {len(result.steps)} steps reused: their config and inputs are unchanged since "
                "they ran (`took` is the time they took then). Pass --overwrite to run them all again."
            ),
            highlight=False,
        )

    console.print(Text("\nSamples (prompt in bold, then the model's completion)", style="bold"))
    for sample in result.samples:  # continuation lines indented under the first
        text = Text.assemble("  ", (sample["prompt"], "bold"), sample["completion"])
        console.print(Text("\n    ").join(text.split("\n", allow_blank=True)), highlight=False)

    console.print(Text("\nWhere everything is", style="bold"))
    for label, path in result.artifacts.items():
        console.print(Text(f"  {label + ':':<18}{_show(path)}"), highlight=False)
    for uri in result.tracking_uris:
        console.print(Text(f"  {'MLflow:':<18}{mlflow_ui_hint(uri)}"), highlight=False, soft_wrap=True)

    console.print(Text("\nNext steps", style="bold"))
    for line in next_steps(result):  # soft-wrapped: a command stays one line to copy
        console.print(Text(f"  {line}"), highlight=False, soft_wrap=True)


def _steps_table(steps: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="Steps", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("step")
    table.add_column("this run")
    table.add_column("took", justify="right")
    table.add_column("result")
    for name, entry in steps.items():
        seconds = entry.get("seconds")
        table.add_row(
            Text(name),
            Text(str(entry.get("status", "?"))),
            Text(f"{seconds:.1f} s" if isinstance(seconds, (int, float)) else "-"),
            Text(describe_step(name, entry)),
        )
    return table


def describe_step(name: str, entry: dict[str, Any]) -> str:
    """One line saying what a step produced."""
    try:
        if name == "curate":
            return f"{entry['documents_kept']:,} of {entry['documents_in']:,} documents kept"
        if name == "tokenizer":
            return f"vocabulary of {int(entry['vocab_size']):,} tokens"
        if name == "tokenize":
            return f"{entry['train_tokens']:,} training tokens"
        if name == "pretrain":
            loss = entry.get("val/loss", entry.get("train/loss"))
            kind = "validation" if "val/loss" in entry else "training"
            return f"{entry['steps']} steps" + (f", {kind} loss {loss:.3f}" if loss is not None else "")
        if name == "register":
            return f"{entry['uri']} = version {entry['version']}"
        if name == "generate":
            return f"{len(entry['samples'])} samples"
    except (KeyError, TypeError, ValueError):
        pass
    return ""


def mlflow_ui_hint(tracking_uri: str) -> str:
    """How to look at an MLflow store: a server is opened in a browser, anything else via `mlflow ui`."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}  (then open http://127.0.0.1:5000)"


def next_steps(result) -> list[str]:
    """Serve the model, then query it with curl or the OpenAI client."""
    model = result.registered or _show(result.model_dir)
    model_id = parse_model_uri(result.registered).name if result.registered else "model"
    prompt = result.samples[0]["prompt"] if result.samples else "Hello"
    body = json.dumps({"model": model_id, "prompt": prompt, "max_tokens": 32})
    return [
        f"serve it:         lmforge serve --model {shlex.quote(model)}",
        "query it:         curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' "
        f"-d {shlex.quote(body)}",
        "or from Python:   from openai import OpenAI; "
        'OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none").completions.create('
        f"model={json.dumps(model_id)}, prompt={json.dumps(prompt)}, max_tokens=32)",
        "run it again:     unchanged steps are reused; --overwrite starts afresh, --resume continues an "
        "interrupted pretraining",
    ]


def _show(path: Path) -> str:
    """A path relative to the current directory when it is below it (shorter to read and to copy)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
