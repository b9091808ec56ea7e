"""`lmforge import-hf` / `lmforge export-hf`: move Llama-family checkpoints in and out."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser(
        "import-hf",
        help="import a Hugging Face Llama-family checkpoint as an lmforge model directory",
        description="Validate a Hugging Face LlamaForCausalLM checkpoint (safetensors only) and write it as "
        "an lmforge model directory. Architectures lmforge cannot represent exactly are refused, naming the "
        "field.",
    )
    imp.add_argument(
        "--input",
        required=True,
        help="Hugging Face model directory (config.json + *.safetensors + tokenizer.json)",
    )
    imp.add_argument("--output", required=True, help="lmforge model directory to write")
    imp.add_argument(
        "--dtype", choices=DTYPES, help="store the weights in this precision (default: as in the input)"
    )
    imp.add_argument(
        "--allow-missing-tokenizer",
        action="store_true",
        help="import the weights even without tokenizer.json",
    )
    imp.set_defaults(func=_import)

    exp = sub.add_parser(
        "export-hf",
        help="export an lmforge model directory as a plain Hugging Face checkpoint",
        description="Write an lmforge model directory as a Hugging Face checkpoint that transformers, vLLM "
        "and llama.cpp's converter load with no conversion.",
    )
    exp.add_argument("--input", required=True, help="lmforge model directory")
    exp.add_argument("--output", required=True, help="Hugging Face directory to write")
    exp.add_argument(
        "--dtype", choices=DTYPES, help="store the weights in this precision (default: as in the input)"
    )
    exp.set_defaults(func=_export)


def _report(verb: str, result) -> int:
    Console().print(
        f"[green]{verb}[/green] {escape(str(result.model_dir))}: {result.num_params:,} parameters, "
        f"{result.dtype}, "
        f"tokenizer files: {escape(', '.join(result.tokenizer_files)) or 'none'}"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from lmforge.components.hf_interop import import_hf

    return _report("imported", import_hf(args.input, args.output, args.dtype, args.allow_missing_tokenizer))


def _export(args: argparse.Namespace) -> int:
    from lmforge.components.hf_interop import export_hf

    return _report("exported", export_hf(args.input, args.output, args.dtype))
