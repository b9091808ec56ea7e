"""The CLI contract: one entry point, --help everywhere, user errors exit 2 with one line."""

import subprocess
import sys

import pytest

from lmforge.cli import COMMAND_MODULES, build_parser, main


def _subcommands(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    names = _subcommands(parser)
    expected = {"tokenizer", "import-hf", "export-hf", "pretrain", "generate", "run"}
    assert expected <= set(names)
    for name, sub in names.items():
        assert sub.format_help().strip(), name
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0, name


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("lmforge ")


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["import-hf", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "is not a directory" in err


def test_command_modules_are_importable():
    import importlib

    for name in COMMAND_MODULES:
        assert hasattr(importlib.import_module(name), "register"), name


def test_a_bug_keeps_its_traceback_and_says_it_is_a_bug(monkeypatch, capsys):
    """A ValueError raised by lmforge's own code is not the user's fault: no one-line "error:" and
    exit 2, but the traceback, one line naming it a bug, and exit 1."""
    import lmforge.cli.hf as hf_cli

    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(hf_cli, "_import", broken)
    code = main(["import-hf", "--input", "in", "--output", "out"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "ValueError: an internal invariant broke" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lmforge import-hf: internal error: this is a bug in lmforge")
