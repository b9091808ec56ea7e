"""The `lmforge` command line: one entry point, one subcommand per lifecycle verb.

Each verb lives in its own module under `lmforge/cli/` exposing `register(subparsers)`; the
module parses arguments and calls the stage's plain function in `components/` (one code path for
the CLI, `lmforge run` and the tests). A user error (bad config, missing file) prints one line
and exits 2; anything else is a bug: its traceback is printed, followed by one line saying so (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from lmforge import __version__
from lmforge.errors import BUG_REPORT_HINT, USER_ERRORS

COMMAND_MODULES = [
    "lmforge.cli.tokenizer",
    "lmforge.cli.hf",
    "lmforge.cli.pretrain",
    "lmforge.cli.generate",
    "lmforge.cli.run",
    "lmforge.cli.curate",
    "lmforge.cli.tokenize",
    "lmforge.cli.serve",
    "lmforge.cli.evaluate",
    "lmforge.cli.registry",
    "lmforge.cli.prune",
    "lmforge.cli.distill",
    "lmforge.cli.export_onnx",
    "lmforge.cli.finetune",
    "lmforge.cli.pipeline",
    "lmforge.cli.quantize",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Curate data, train a tokenizer and a language model, fine-tune, compress, evaluate, "
        "register and serve it: private domain-specific language models on your own machines.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except USER_ERRORS as err:
        print(f"lmforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"lmforge {args.command}: internal error: {BUG_REPORT_HINT}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
