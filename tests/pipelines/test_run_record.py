"""The run record: a failing run never replaces run.json; digests follow content, not time."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.pipelines.run_record import PARTIAL, RECORD, RunRecord, files_digest


def test_failed_run_keeps_the_last_successful_record(tmp_path: Path) -> None:
    first = RunRecord(tmp_path, {"n": 1})
    first.set_step("curate", {"status": "ran", "seconds": 1.0})
    assert json.loads((tmp_path / PARTIAL).read_text())["status"] == "running"  # in progress
    first.finish("succeeded")
    good = (tmp_path / RECORD).read_bytes()
    assert not (tmp_path / PARTIAL).exists()

    second = RunRecord(tmp_path, {"n": 2})
    second.set_step("curate", {"status": "failed"})
    second.finish("failed", "boom")
    assert (tmp_path / RECORD).read_bytes() == good
    partial = json.loads((tmp_path / PARTIAL).read_text())
    assert partial["status"] == "failed" and partial["error"] == "boom"

    third = RunRecord(tmp_path, {"n": 3})
    third.finish("succeeded")
    assert json.loads((tmp_path / RECORD).read_text())["config"] == {"n": 3}
    assert not (tmp_path / PARTIAL).exists()


def test_files_digest_changes_with_content_and_names_only(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    first = files_digest(tmp_path, ["a.bin"])
    assert files_digest(tmp_path, ["a.bin"]) == first
    (tmp_path / "a.bin").write_bytes(b"abd")
    assert files_digest(tmp_path, ["a.bin"]) != first
    (tmp_path / "b.bin").write_bytes(b"abd")
    assert files_digest(tmp_path, ["b.bin"]) != files_digest(tmp_path, ["a.bin"])
