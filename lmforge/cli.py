"""The `lmforge` command line: one entry point, one subcommand per lifecycle verb.

Each verb lives in its own module under `lmforge/commands/` exposing `register(subparsers)`; the
module parses arguments and calls the stage's plain function in `components/` (one code path for
the CLI, the tests and the KFP components). A user error (bad config, missing file) prints one line
and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmforge import __version__
from lmforge.errors import USER_ERRORS

COMMAND_MODULES = [
    "lmforge.commands.tokenizer",
    "lmforge.commands.hf",
    "lmforge.commands.pretrain",
    "lmforge.commands.generate",
    "lmforge.commands.run",
    "lmforge.commands.curate",
    "lmforge.commands.tokenize",
    "lmforge.commands.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train, fine-tune, evaluate and serve private domain-specific language models.",
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
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
