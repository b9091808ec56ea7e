"""`lmforge quantize`: weight-only int8 / int4 quantization of a model directory.

lmforge quantize --model out/model --output out/model-int8 --method int8
lmforge quantize --model models:/bot@champion --output out/model-awq --method int4-awq \\
    --group-size 64 --calibration out/tokens --set num_sequences=256

The output is a model directory in the compressed-tensors layout (loads in lmforge, `lmforge serve`,
transformers with compressed-tensors, vLLM) plus report.json.
"""

from __future__ import annotations

import argparse

from lmforge.cli._args import add_set_arg

SETTABLE = ("num_sequences", "seq_len", "min_sequences", "gptq_act_order")


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.components.quantize import METHODS

    parser = subparsers.add_parser(
        "quantize",
        help="quantize a model's weights to int8 or int4 (plain or calibrated)",
        description="Weight-only post-training quantization: int8 per-channel symmetric, int4 group-wise "
        "asymmetric round-to-nearest, or int4 calibrated with AWQ-style scaling or GPTQ error compensation. "
        "Writes a model directory in the compressed-tensors layout and report.json (bytes before/after).",
    )
    parser.add_argument("--model", required=True, metavar="DIR|models:/NAME@ALIAS", help="model to quantize")
    parser.add_argument("--output", required=True, metavar="DIR", help="quantized model directory to write")
    parser.add_argument("--method", required=True, metavar="METHOD", help=f"one of {', '.join(METHODS)}")
    parser.add_argument(
        "--group-size",
        type=int,
        default=64,
        metavar="N",
        help="int4 columns per scale (32, 64, 128; default 64)",
    )
    parser.add_argument(
        "--calibration",
        metavar="DATA",
        help="token-shard dir (`lmforge tokenize`) or JSONL text (a curated split); "
        "needed by int4-awq and int4-gptq",
    )
    parser.add_argument(
        "--keep-embeddings",
        action="store_true",
        help="keep the output head in its stored precision (the input embedding always is)",
    )
    add_set_arg(parser, example="num_sequences=256")
    parser.set_defaults(func=run)


def _settings(overrides: list[str]) -> dict[str, int]:
    from lmforge.errors import ConfigError

    values: dict[str, int] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in SETTABLE:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(SETTABLE)}")
        if key == "gptq_act_order" and value not in ("0", "1"):
            raise ConfigError(f"--set gptq_act_order={value!r}: must be 1 (on, default) or 0 (column order)")
        try:
            values[key] = int(value)
        except ValueError:
            raise ConfigError(f"--set {key}={value!r}: must be an integer") from None
    return values


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from lmforge.components.quantize.stage import quantize

    console = Console(stderr=True)
    result = quantize(
        args.model,
        args.output,
        method=args.method,
        group_size=args.group_size,
        calibration=args.calibration,
        keep_embeddings=args.keep_embeddings,
        log=lambda msg: console.print(escape(msg)),
        **_settings(args.overrides),
    )
    r = result.report
    Console().print(
        f"[green]quantized[/green] {escape(str(result.output_dir))}: {r['method']}, "
        f"{r['bytes_before']:,} -> {r['bytes_after']:,} bytes ({r['ratio']:.3f}x; linear layers "
        f"{r['linear_ratio']:.3f}x)"
    )
    return 0
