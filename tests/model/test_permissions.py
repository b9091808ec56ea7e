"""Model directories are published with the process umask's permissions, not the private ones of
the temp directory they are written in (0700 directory, 0600 safetensors): a model exported or
trained by one user must be readable by another, or by a serving pod running as another uid.

Covers the shared writer (`save_model_dir`) and every command that publishes a model directory
through it: import-hf, export-hf (here) and pretraining / consolidate (tests/components)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.model.checkpoint import current_umask, save_model_dir
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer


@pytest.fixture()
def umask():
    """Run the test under a chosen umask (the process-wide setting), restored afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """Relative path -> permission bits, for the directory itself ('.') and everything in it."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


def assert_umask_modes(root: Path, mask: int) -> None:
    found = modes(root)
    expected = {name: (0o777 if name == "." or (root / name).is_dir() else 0o666) & ~mask for name in found}
    assert found == expected, {k: oct(v) for k, v in found.items()}


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny", vocab_size=400)).eval()


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=oct)
def test_model_directory_follows_the_umask(tmp_path, tokenizer_dir, umask, mask):
    umask(mask)
    out = save_model_dir(tiny_model(), tmp_path / "models" / "m", tokenizer_dir=tokenizer_dir)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert_umask_modes(out, mask)


def test_private_source_files_are_published_with_the_umask(tmp_path, tokenizer_dir, umask):
    """A tokenizer or extra file copied from a private (0600) source does not keep its mode."""
    umask(0o022)
    private = tmp_path / "private-tokenizer"
    private.mkdir(mode=0o700)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (private / name).write_bytes((tokenizer_dir / name).read_bytes())
        (private / name).chmod(0o600)
    extra = tmp_path / "generation_config.json"
    extra.write_text('{"eos_token_id": 1}\n')
    extra.chmod(0o600)
    out = save_model_dir(
        tiny_model(), tmp_path / "m", tokenizer_dir=private, extra_files={"generation_config.json": extra}
    )
    assert_umask_modes(out, 0o022)


def test_current_umask_reads_without_changing_it(umask):
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027  # unchanged by reading it


def test_import_hf_and_export_hf_write_readable_directories(tmp_path, tokenizer_dir, umask):
    umask(0o022)
    source = save_model_dir(tiny_model(), tmp_path / "src", tokenizer_dir=tokenizer_dir)
    os.chmod(source, 0o700)  # e.g. a download into a private directory
    for path in source.iterdir():
        path.chmod(0o600)
    assert main(["import-hf", "--input", str(source), "--output", str(tmp_path / "imported")]) == 0
    assert_umask_modes(tmp_path / "imported", 0o022)
    assert main(["export-hf", "--input", str(tmp_path / "imported"), "--output", str(tmp_path / "hf")]) == 0
    assert_umask_modes(tmp_path / "hf", 0o022)
