"""`lmforge distill`: train a smaller student on token shards to match a frozen teacher (KL on
temperature-softened logits + hard labels), through the pretraining loop on Ray Train or in-process."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from lmforge.cli._args import add_config_args
from lmforge.cli.pretrain import EXIT_PREEMPTED

TEACHER_HALF = "teacher-half"  # --student-preset value: half the teacher's layers, from its own weights


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distill a teacher into a smaller student (KL to the teacher + hard labels, on Ray Train)",
        description="Train a student on the token shards written by `lmforge tokenize` with loss "
        "alpha*T^2*KL(teacher||student) + (1-alpha)*cross-entropy (distill.alpha, distill.temperature), "
        "through the pretraining loop: Ray Train workers (or --local), strategies, checkpoints, --resume, "
        "MLflow. The student: --student-preset NAME (a model preset, with the teacher's vocabulary; "
        f"'{TEACHER_HALF}' = the teacher's architecture with half its layers, initialised from evenly spaced "
        "teacher layers) or --student DIR. Output as `lmforge pretrain`'s (OUTPUT/model is the student) plus "
        "OUTPUT/distill_report.json with the held-out KL and loss before and after.",
    )
    p.add_argument("--teacher", required=True, metavar="DIR", help="teacher model directory")
    student = p.add_mutually_exclusive_group(required=True)
    student.add_argument("--student-preset", metavar="NAME", help=f"model preset, or {TEACHER_HALF}")
    student.add_argument("--student", metavar="DIR", help="student model directory to start from")
    p.add_argument("--data", required=True, metavar="SHARDS", help="token shards (`lmforge tokenize`)")
    p.add_argument("--output", required=True, metavar="DIR", help="run directory (model/, checkpoints/, ...)")
    add_config_args(
        p,
        example="distill.alpha=0.7 --set schedule.max_steps=500",
        config_help="YAML with pretraining fields",
    )
    p.add_argument("--resume", metavar="auto|PATH", help="continue from a checkpoint (as lmforge pretrain)")
    p.add_argument("--local", action="store_true", help="train in this process without Ray")
    p.add_argument("--verbose", action="store_true", help="also print Ray's and the workers' own logs")
    p.set_defaults(func=_distill)


def _distill(args: argparse.Namespace) -> int:
    from lmforge.components.distill import DistillConfig, distill
    from lmforge.config import apply_overrides, build, read_yaml

    data = read_yaml(args.config) if args.config else {}
    data["output_dir"] = args.output
    data.setdefault("distill", {})["teacher"] = args.teacher
    data.setdefault("data", {})["shards_dir"] = args.data
    model = data.setdefault("model", {})
    if args.student:
        model["init_from"] = args.student
    elif args.student_preset == TEACHER_HALF:
        data["distill"]["student_layers"] = "half"
    else:
        model["preset"] = args.student_preset
    overrides = list(args.overrides) + (["ray.num_workers=0"] if args.local else [])
    cfg = build(DistillConfig, apply_overrides(data, overrides))
    result = distill(cfg, resume=args.resume, verbose=args.verbose)
    run = result.run
    console = Console()
    if run.preempted:
        console.print(
            f"[yellow]stopped[/yellow] at step {run.step}: checkpoint {escape(str(run.checkpoint_dir))}; "
            "continue by running the same command with --resume auto"
        )
        return EXIT_PREEMPTED
    after = result.report.get("after", {})
    before = result.report.get("before", {})
    figures = (
        f"; held-out KL to teacher {before.get('kl', float('nan')):.4f} -> {after['kl']:.4f}, "
        f"loss {after['loss']:.4f} (teacher {after['teacher_loss']:.4f})"
        if after
        else ""
    )
    console.print(
        f"[green]distilled[/green] {escape(str(run.model_dir))} ({run.step} steps{figures})"
        + (f"; MLflow run {run.mlflow_run_id}" if run.mlflow_run_id else "")
    )
    return 0
