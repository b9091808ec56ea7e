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
    add_set_arg(parser, example=example)


def add_set_arg(parser: argparse.ArgumentParser, *, example: str) -> None:
    """Add only the repeatable `--set KEY=VALUE` override (`args.overrides`), for a verb whose config
    file has its own flag (`lmforge evaluate --suite FILE`)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field, e.g. --set {example} (repeatable)",
    )


def add_device_arg(parser: argparse.ArgumentParser, *, default: str = "cpu") -> None:
    """Add `--device`. The verb checks the value with `lmforge.devices.check_device` before any work,
    so a malformed or absent device is one line (exit 2), never a traceback from deep in torch."""
    from lmforge.devices import CHOICES

    parser.add_argument(
        "--device", default=default, metavar="DEVICE", help=f"torch device: {CHOICES} (default {default})"
    )
