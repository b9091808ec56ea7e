"""The bundled fine-tuning task (data/finetune/, built by scripts/build_instruct_task.py): the files
are what the script builds, their hashes are the ones SOURCES.md records, held-out examples come
only from documents the demo's curation keeps out of training, and every example is well formed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "finetune"


def _items(name: str) -> list[dict]:
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_examples_are_well_formed_and_split_by_document() -> None:
    from lmforge.components.curate.split import assign_split
    from lmforge.config import load
    from lmforge.pipelines.config import LifecycleConfig

    split_cfg = load(LifecycleConfig, str(REPO / "configs" / "demo.yaml"), []).curate.split
    train, held = _items("train"), _items("heldout")
    assert len(train) > 500 and len(held) >= 40
    for items, wanted in ((train, {"train"}), (held, {"validation", "test"})):
        for item in items:
            assert item["kind"] in ("title", "qa") and item["prompt"] and item["response"].startswith(" ")
            assert item["prompt"].endswith(("Title:", "Answer:"))
            assert assign_split(item["id"].split("#")[0], split_cfg) in wanted, item["id"]
    assert not {i["prompt"] for i in train} & {i["prompt"] for i in held}


def test_sources_md_hashes_match_the_files() -> None:
    text = (DATA / "SOURCES.md").read_text()
    for name in ("train", "heldout"):
        digest = hashlib.sha256((DATA / f"{name}.jsonl").read_bytes()).hexdigest()
        assert f"| {name}.jsonl | {len(_items(name))} |" in text and digest in text


@pytest.mark.slow  # the script reads and splits the whole sample corpus (~30 s on 2 busy cores)
def test_script_rebuilds_the_same_bytes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_instruct_task.py"), "--output", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
