"""`lmforge run`: the whole lifecycle on this machine with embedded defaults (no services needed)."""

from __future__ import annotations

import argparse
import json

from lmforge.cli._args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="run the whole lifecycle locally: curate, tokenizer, tokenize, pretrain, register, generate",
        description="Run every stage in order on this machine (local folders, MLflow on sqlite, local Ray), "
        "ending with a registered model and sample generations. Outputs go under the config's workdir; "
        "a record of each step is kept in <workdir>/run.json.",
    )
    add_config_args(
        parser,
        example="pretrain.schedule.max_steps=50",
        config_help="lifecycle YAML (e.g. configs/demo.yaml); default: built-in defaults",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmforge.config import load
    from lmforge.pipelines.lifecycle import LifecycleConfig, run_lifecycle

    console = Console()
    cfg = load(LifecycleConfig, args.config, args.overrides)
    result = run_lifecycle(cfg, log=lambda msg: console.print(msg, highlight=False))
    console.rule("lmforge run finished")
    console.print(f"model directory: {result.model_dir}")
    if result.registered:
        console.print(f"registered as:   {result.registered}")
    for sample in result.samples:
        console.print(f"[bold]prompt:[/bold] {sample['prompt']}")
        console.print(f"[bold]completion:[/bold] {sample['completion']}", highlight=False)
    console.print(f"step record: {result.workdir / 'run.json'}")
    console.print_json(json.dumps({name: step.get("seconds") for name, step in result.steps.items()}))
    return 0
