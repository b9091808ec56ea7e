"""`lmforge finetune` (LoRA / QLoRA / full fine-tuning through peft, in-process or on Ray Train) and
`lmforge merge` (fold a LoRA adapter into its base model)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from lmforge.cli._args import add_config_args

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the run checkpointed and stopped early; rerun with --resume auto


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a base model on instruction / chat / text JSONL (LoRA, QLoRA or full, through peft)",
        description="Adapt a base model (a model directory or models:/NAME@ALIAS) to a task: LoRA adapters "
        "through peft on a frozen base (method lora), on a quantized base from `lmforge quantize` (qlora), "
        "or every parameter (full). Loss on response tokens only. Trains in this process "
        "(ray.num_workers: 0) or on Ray Train workers with the pretraining loop's checkpoints and exact "
        "resume. Writes <output_dir>/adapter (PEFT layout), <output_dir>/merged with merge: true, "
        "metrics and the adapter to MLflow. SIGTERM or Ctrl-C checkpoints and stops (exit 143); "
        "continue with --resume auto.",
    )
    add_config_args(
        p,
        example="lora.r=16 --set optim.lr=1e-4",
        required=True,
        config_help="YAML config (e.g. configs/finetune-demo.yaml)",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from the newest checkpoint in output_dir (auto) or from a checkpoint directory",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also print Ray's and the workers' own logs (always written to <output_dir>/logs/)",
    )
    p.set_defaults(func=_finetune)

    m = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model (a plain model directory)",
        description="Write base + adapter as one model directory (Hugging Face Llama layout, fp32): the "
        "adapter's low-rank update is added into the base weights, so the result needs no peft to load.",
    )
    m.add_argument("--base", required=True, metavar="DIR", help="the base model directory")
    m.add_argument("--adapter", required=True, metavar="DIR", help="a PEFT LoRA adapter directory")
    m.add_argument("--output", required=True, metavar="DIR", help="model directory to write")
    m.set_defaults(func=_merge)


def _finetune(args: argparse.Namespace) -> int:
    from lmforge.components.finetune.config import load_finetune_config
    from lmforge.components.finetune.stage import finetune

    cfg = load_finetune_config(args.config, list(args.overrides))
    result = finetune(cfg, resume=args.resume, verbose=args.verbose)
    console = Console()
    if result.preempted:
        console.print(
            f"[yellow]stopped[/yellow] at step {result.step}: "
            f"checkpoint {escape(str(result.checkpoint_dir))}; "
            "continue by running the same command with --resume auto"
        )
        return EXIT_PREEMPTED
    loss = result.metrics.get("val/loss", result.metrics.get("train/loss"))
    written = [str(p) for p in (result.adapter_dir, result.merged_dir) if p is not None]
    console.print(
        f"[green]fine-tuned[/green] {escape(', '.join(written))} ({result.step} steps"
        + (f", loss {loss:.4f}" if loss is not None else "")
        + f", {result.metrics['model/trainable_pct']:.3f}% of parameters trained)"
        + (f"; MLflow run {result.mlflow_run_id}" if result.mlflow_run_id else "")
        + (f"; registered version {result.registered_version}" if result.registered_version else "")
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from lmforge.components.finetune.merge import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.output)
    Console().print(
        f"[green]merged[/green] {escape(args.adapter)} into {escape(args.base)} -> {escape(str(out))}"
    )
    return 0
