"""`lmforge export-onnx`: the decoder with KV-cache inputs/outputs as one ONNX graph (prefill with an
empty past, decode with the previous presents), checked against PyTorch with onnxruntime."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export a model to ONNX (KV cache in/out, prefill + decode), checked with onnxruntime",
        description="Export a model directory to OUTPUT/model.onnx: inputs input_ids (batch, seq) and "
        "past_key_values.{i}.key/value (batch, kv_heads, past, head_dim); outputs logits and "
        "present.{i}.key/value. The prefill passes pasts of length 0. onnxruntime's logits are compared "
        "with PyTorch's on a prefill and decode steps (the export fails beyond --atol). config.json, "
        "generation_config.json, the tokenizer and onnx_export.json (names, shapes, parity) go beside it.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model directory to export")
    p.add_argument("--output", required=True, metavar="DIR", help="new directory for model.onnx and metadata")
    p.add_argument(
        "--opset", type=int, default=18, help="ONNX opset (>= 18, the default: torch's exporter starts there)"
    )
    p.add_argument("--atol", type=float, default=1e-4, help="parity tolerance on logits (default 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from lmforge.components.onnx_export import export_onnx

    result = export_onnx(args.model, args.output, opset=args.opset, check=not args.no_check, atol=args.atol)
    parity = result.metadata.get("parity")
    Console().print(
        f"[green]exported[/green] {escape(str(result.onnx_path))} (opset {result.metadata['opset']}"
        + (f", onnxruntime max |logit diff| {parity['max_abs_diff']:.2e}" if parity else ", not checked")
        + ")"
    )
    return 0
