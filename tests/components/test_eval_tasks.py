"""The bundled evaluation tasks (data/eval/, built by scripts/build_eval_tasks.py): provenance that
matches the files, no item from a document the demo's curation trains on, items that are answerable,
and the demo suite and gate that use them."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EVAL = REPO / "data" / "eval"
TASKS = ("heldout", "titles", "qa", "choice")


def _items(name: str) -> list[dict]:
    with open(EVAL / f"{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _sources_table(section: str) -> list[list[str]]:
    """Rows of the markdown table under `## {section}` in SOURCES.md."""
    text = (EVAL / "SOURCES.md").read_text()
    block = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows[1:]]


@pytest.fixture(scope="module")
def demo_split():
    """The split assignment of the demo's curation (configs/demo.yaml)."""
    from lmforge.components.curate.split import assign_split
    from lmforge.config import load
    from lmforge.pipelines.config import LifecycleConfig

    cfg = load(LifecycleConfig, str(REPO / "configs" / "demo.yaml"), [])
    return lambda doc_id: assign_split(doc_id, cfg.curate.split)


def test_every_file_is_listed_with_its_hash_and_item_count():
    rows = {row[0]: row for row in _sources_table("Files")}
    assert sorted(rows) == sorted(f"{t}.jsonl" for t in TASKS)
    for name in TASKS:
        path = EVAL / f"{name}.jsonl"
        assert rows[path.name][2] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert int(rows[path.name][1]) == len(_items(name)) > 0
    assert sum(p.stat().st_size for p in EVAL.iterdir()) < 400_000  # small files only


def test_source_documents_match_their_hashes_and_are_not_in_the_train_split(demo_split):
    rows = _sources_table("Source documents")
    assert rows
    for doc_id, split, digest in rows:
        path = REPO / "data" / "sample" / doc_id  # ids are <input folder name>/<relative path>
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        assert demo_split(doc_id) == split != "train"


def test_no_item_comes_from_a_training_document(demo_split):
    listed = {row[0] for row in _sources_table("Source documents")}
    for name in TASKS:
        for item in _items(name):
            assert item["id"].startswith(item["source"] + "#")
            assert item["source"] in listed
            assert demo_split(item["source"]) != "train", (name, item["id"])


def test_items_are_unique_and_answerable():
    for name in TASKS:
        ids = [it["id"] for it in _items(name)]
        assert len(ids) == len(set(ids)), name
    for it in _items("qa"):
        assert it["answer"] in " ".join(it["context"].split()), it["id"]  # the answer is in the context
        name = re.search(r"`([\w.]+)`", it["question"]).group(1)
        assert it["id"].endswith("#" + name)
    for it in _items("titles"):
        assert it["title"].strip() and it["document"].strip()
    titles_ids = {it["id"] for it in _items("titles")}
    for it in _items("choice"):
        choices = it["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= it["answer"] < 4
        assert it["id"] not in titles_ids  # a section is in one of the two tasks only
    # the right heading is the section's own: it appears as a heading in its source document
    for it in _items("choice"):
        source = (REPO / "data" / "sample" / it["source"]).read_text()
        right = it["choices"][it["answer"]]
        assert re.search(rf"^{re.escape(right)}\n[=\-~^\"*+#`'.:_]{{3,}}$", source, re.M), it["id"]


def test_heldout_documents_are_source_text():
    """Perplexity items are sections of the source document as written (before any cut)."""
    for it in _items("heldout"):
        source = (REPO / "data" / "sample" / it["source"]).read_text()
        heading, underline, body = it["text"].split("\n", 2)
        assert f"{heading}\n{underline}\n{body[:200]}" in source


def test_demo_suite_and_gate_load():
    from lmforge.components.evaluate.gate import load_gate
    from lmforge.components.evaluate.suite import load_suite

    suite = load_suite(REPO / "configs" / "eval-demo.yaml")
    assert {t.name: len(t.items) for t in suite.tasks} == {t: len(_items(t)) for t in TASKS}
    keys = {t.name: t.config.metric_keys for t in suite.tasks}
    gate = load_gate(str(REPO / "configs" / "gate-demo.yaml"), keys, has_baseline=True)
    assert gate.rules


@pytest.mark.slow
def test_the_script_rebuilds_the_committed_files_byte_for_byte(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_eval_tasks.py"), "--output", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in [f"{t}.jsonl" for t in TASKS] + ["SOURCES.md"]:
        assert (tmp_path / name).read_bytes() == (EVAL / name).read_bytes(), name
