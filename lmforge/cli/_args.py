"""Argument helpers shared by the verbs: the one place `--config FILE` and `--set KEY=VALUE` are declared."""

from __future__ import annotations

import argparse


def add_config_args(
    parser: argparse.ArgumentParser,
    *,
    example: str,
    required: bool = False,
    config_help: str = "YAML config (default: built-in defaults)",
) -> None:
    """Add `--config FILE` and the repeatable `--set KEY=VALUE` override (collected in `args.overrides`).

    `example` is one override shown in the help, e.g. `optim.lr=1e-4`.
    """
    parser.add_argument("--config", required=required, metavar="FILE", help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field, e.g. --set {example} (repeatable)",
    )
