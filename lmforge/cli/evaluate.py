"""`lmforge evaluate`: measure a model on a task suite, write a report, log it to MLflow, apply a gate.

lmforge evaluate --model out/model --suite configs/eval-demo.yaml --output out/eval
lmforge evaluate --model models:/bot@challenger --baseline models:/bot@champion \\
    --suite configs/eval-demo.yaml --gate configs/gate-demo.yaml --output out/eval

Exit codes: 0 when the evaluation ran (a gate's verdict is in the output), 3 when a gate was given
and failed, 2 on bad input (suite, gate, model directory, device).
"""

from __future__ import annotations

import argparse

from lmforge.cli._args import add_device_arg, add_set_arg

GATE_FAILED = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model on a task suite and apply a promotion gate",
        description="Score a model (perplexity and bits per byte, generation and multiple-choice tasks) on a "
        "YAML task suite; write metrics.json, report.md, samples.jsonl and plots to --output and log an "
        "MLflow run. Exit 0 when it ran, 3 when --gate failed, 2 on bad input.",
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR|models:/NAME@ALIAS", help="the model to evaluate"
    )
    parser.add_argument("--suite", required=True, metavar="FILE", help="task suite YAML")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the report files")
    parser.add_argument(
        "--baseline", metavar="DIR|models:/NAME@ALIAS", help="evaluate this model too and compare"
    )
    parser.add_argument("--gate", metavar="FILE", help="gate YAML: rules the model must meet to pass")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N items of each task")
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="B", help="sequences per forward (default 8)"
    )
    parser.add_argument(
        "--train-data", metavar="DIR", help="training split: report (or filter) eval items found in it"
    )
    add_device_arg(parser, default="cpu")
    # the suite file is --suite; --set overrides its top-level fields (window, stride, decontaminate, ...)
    add_set_arg(parser, example="stride=256")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.components.evaluate.stage import evaluate

    result = evaluate(
        args.model,
        args.suite,
        args.output,
        baseline=args.baseline,
        gate=args.gate,
        limit=args.limit,
        batch_size=args.batch_size,
        train_data=args.train_data,
        device=args.device,
        overrides=args.overrides,
    )
    print(f"wrote {result.output_dir}/metrics.json, report.md, samples.jsonl (MLflow run {result.run_id})")
    for task, values in result.metrics["tasks"].items():
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"  {task}: {shown}")
    if result.gate_passed is None:
        return 0
    gate = result.metrics["gate"]
    print("gate: passed" if gate["passed"] else "gate: FAILED")
    for reason in gate["reasons"]:
        print(f"  {reason}")
    return 0 if result.gate_passed else GATE_FAILED
