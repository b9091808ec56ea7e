"""`lmforge prune`: global magnitude or structured (MLP channels, attention kv-groups) pruning of a
model directory, with an optional short recovery fine-tune; reports the sparsity reached and the
held-out loss before and after."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape

from lmforge.cli._args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model: global magnitude (zeros) or structured (smaller matrices), optional recovery",
        description="Prune a model directory. magnitude: the smallest-|w| fraction S of all block weights "
        "(one global threshold) set to zero, shapes unchanged. structured: the fraction S of the MLP "
        "channels "
        "and attention kv-groups removed, so the matrices shrink and OUTPUT is a smaller Llama model. With "
        "--data, the held-out loss on its validation split is reported before and after (and structured "
        "scores use activations of its train split); --recovery-steps N fine-tunes the pruned model for N "
        "steps on the train split through the pretraining loop (magnitude keeps its zeros).",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model directory to prune")
    p.add_argument("--output", required=True, metavar="DIR", help="pruned model directory to write")
    p.add_argument("--sparsity", required=True, type=float, metavar="S", help="fraction to remove, in (0, 1)")
    p.add_argument("--method", required=True, choices=("magnitude", "structured"), help="pruning method")
    p.add_argument("--data", metavar="SHARDS", help="token shards (`lmforge tokenize`) for quality/recovery")
    p.add_argument("--recovery-steps", type=int, metavar="N", help="recovery fine-tune steps (needs --data)")
    add_config_args(
        p, example="structured.heads=false", config_help="YAML with PruneConfig fields (optional)"
    )
    p.set_defaults(func=_prune)


def _prune(args: argparse.Namespace) -> int:
    from lmforge.components.prune import PruneConfig, prune
    from lmforge.config import apply_overrides, build, read_yaml

    data = read_yaml(args.config) if args.config else {}
    data.update(model=args.model, output=args.output, sparsity=args.sparsity, method=args.method)
    if args.data is not None:
        data["data"] = args.data
    if args.recovery_steps is not None:
        data.setdefault("recovery", {})["steps"] = args.recovery_steps
    cfg = build(PruneConfig, apply_overrides(data, args.overrides))
    result = prune(cfg)
    report = result.report
    summary = {k: v for k, v in report.items() if k not in ("layers",)}
    Console().print(
        f"[green]pruned[/green] {escape(str(result.model_dir))}: {cfg.method}, sparsity "
        f"{report['sparsity']:.4f} of the prunable weights ({report['model_sparsity']:.4f} of all)"
    )
    print(json.dumps(summary, indent=2))
    return 0
