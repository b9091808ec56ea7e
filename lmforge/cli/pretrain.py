"""`lmforge pretrain` (train on token shards, in-process or on Ray Train) and `lmforge consolidate`
(turn a training checkpoint, including FSDP / ZeRO shards, into a plain model directory)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from lmforge.cli._args import add_config_args

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the run checkpointed and stopped early; rerun with --resume auto


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a model on token shards (Ray Train: DDP, FSDP or DeepSpeed ZeRO)",
        description="Train the lmforge transformer on the token shards written by `lmforge tokenize`, on "
        "Ray Train workers (a local Ray, or the cluster in $RAY_ADDRESS) or in this process (--local). "
        "Checkpoints go to <output_dir>/checkpoints, the final model (Hugging Face layout) to "
        "<output_dir>/model, metrics to MLflow, Ray's and the workers' logs to <output_dir>/logs/ (the "
        "console shows the progress lines; --verbose adds Ray's). SIGTERM or Ctrl-C checkpoints and stops "
        "(exit 143; a second Ctrl-C aborts); continue with --resume auto.",
    )
    add_config_args(
        p,
        example="optim.lr=1e-4 --set strategy.name=fsdp",
        required=True,
        config_help="YAML config (e.g. configs/pretrain-tiny.yaml)",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from the newest checkpoint in output_dir (auto) or from a checkpoint directory",
    )
    p.add_argument(
        "--local", action="store_true", help="train in this process without Ray (= --set ray.num_workers=0)"
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also print Ray's and the workers' own logs (always written to <output_dir>/logs/)",
    )
    p.set_defaults(func=_pretrain)

    c = sub.add_parser(
        "consolidate",
        help="write a pretraining checkpoint (DDP, FSDP or ZeRO shards) as a plain model directory",
        description="Merge a checkpoint written by `lmforge pretrain` (every rank's FSDP or DeepSpeed ZeRO "
        "shards) into one fp32 model directory in the Hugging Face Llama layout.",
    )
    c.add_argument("checkpoint", help="a checkpoint directory, e.g. OUT/checkpoints/step-00001000")
    c.add_argument("output", help="model directory to write")
    c.add_argument("--tokenizer-dir", help="tokenizer files to include (default: the one the run used)")
    c.set_defaults(func=_consolidate)


def _pretrain(args: argparse.Namespace) -> int:
    from lmforge.components.pretrain import PretrainConfig, pretrain
    from lmforge.components.pretrain.stage import result_summary
    from lmforge.config import load

    overrides = list(args.overrides) + (["ray.num_workers=0"] if args.local else [])
    cfg = load(PretrainConfig, args.config, overrides)
    result = pretrain(cfg, resume=args.resume, verbose=args.verbose)
    console = Console()
    summary = result_summary(result)
    if result.preempted:
        console.print(
            f"[yellow]stopped[/yellow] at step {result.step}: "
            f"checkpoint {escape(str(result.checkpoint_dir))}; "
            "continue by running the same command with --resume auto"
        )
        return EXIT_PREEMPTED
    loss = summary.get("val/loss", summary.get("train/loss"))
    console.print(
        f"[green]pretrained[/green] {escape(str(result.model_dir))} ({result.step} steps"
        + (f", loss {loss:.4f}" if loss is not None else "")
        + ")"
        + (f"; MLflow run {result.mlflow_run_id}" if result.mlflow_run_id else "")
    )
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from lmforge.components.pretrain import consolidate

    out = consolidate(args.checkpoint, args.output, tokenizer_dir=args.tokenizer_dir)
    Console().print(f"[green]consolidated[/green] {escape(args.checkpoint)} -> {escape(str(out))}")
    return 0
