"""The run record: a failing run never replaces run.json; fingerprints follow content, not time."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.pipelines.run_record import PARTIAL, RECORD, RunRecord, fingerprint, tree_digest


def test_failed_run_keeps_the_last_successful_record(tmp_path: Path) -> None:
    first = RunRecord(tmp_path, {"n": 1})
    first.set_step("curate", {"status": "ran", "fingerprint": "a"})
    first.finish("succeeded")
    good = (tmp_path / RECORD).read_bytes()
    assert not (tmp_path / PARTIAL).exists()

    second = RunRecord(tmp_path, {"n": 2})
    assert second.earlier("curate") == [{"status": "ran", "fingerprint": "a"}]
    second.set_step("curate", {"status": "failed", "fingerprint": "b", "error": "boom"})
    second.finish("failed", "boom")
    assert (tmp_path / RECORD).read_bytes() == good
    partial = json.loads((tmp_path / PARTIAL).read_text())
    assert partial["status"] == "failed" and partial["error"] == "boom"

    third = RunRecord(tmp_path, {"n": 3})  # newest attempt first: it knows the workdir's state best
    assert [e["fingerprint"] for e in third.earlier("curate")] == ["b", "a"]
    third.finish("succeeded")
    assert json.loads((tmp_path / RECORD).read_text())["config"] == {"n": 3}
    assert not (tmp_path / PARTIAL).exists()


def test_records_of_another_format_are_ignored(tmp_path: Path) -> None:
    (tmp_path / RECORD).write_text(json.dumps({"curate": {"seconds": 1}}))  # the flat pre-1 layout
    assert RunRecord(tmp_path, {}).earlier("curate") == []


def test_fingerprint_follows_config_and_input_digests() -> None:
    base = fingerprint("tokenizer", {"vocab_size": 600}, {"data": "d1"})
    assert base == fingerprint("tokenizer", {"vocab_size": 600}, {"data": "d1"})
    assert base != fingerprint("tokenizer", {"vocab_size": 601}, {"data": "d1"})
    assert base != fingerprint("tokenizer", {"vocab_size": 600}, {"data": "d2"})
    assert fingerprint("curate", {}, {"inputs": None}) is None  # never reusable


def test_tree_digest_changes_with_content_only(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"abc")
    (tmp_path / ".hidden").write_text("ignored")
    first = tree_digest(tmp_path)
    (tmp_path / ".hidden").write_text("still ignored")
    assert tree_digest(tmp_path) == first
    (tmp_path / "sub" / "a.bin").write_bytes(b"abd")
    assert tree_digest(tmp_path) != first
