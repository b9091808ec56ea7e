"""The `lmforge` command line: the top layer. One module per verb, each exposing `register(subparsers)`;
a verb parses its arguments and calls a stage's plain function, nothing more."""

from lmforge.cli.entrypoint import COMMAND_MODULES, build_parser, main

__all__ = ["COMMAND_MODULES", "build_parser", "main"]
