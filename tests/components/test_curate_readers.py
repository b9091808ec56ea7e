"""Reading inputs in bounded memory: oversized documents (the "200 MB single line", with a small
limit so the test is fast), JSONL byte ranges shared by workers, broken gzip, odd folders."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from lmforge.components.curate import CurateConfig, curate
from lmforge.components.curate.readers import Opener, iter_raw_docs, list_sources, plan_tasks
from lmforge.config import load
from lmforge.errors import ConfigError, UserError

VOCAB = (
    "the of and to with that have be service operator cluster node restart upgrade log probe timeout "
    "health check disk memory network request queue worker retry backoff config secret volume pod "
    "deployment rollout version release image registry build test metric alert dashboard"
).split()


def prose(seed: int, words: int = 120) -> str:
    """Distinct English-like text per seed (so documents are not near-duplicates of each other)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(words)) + "."


LIMIT = 64 * 1024
BIG = (
    1024 * 1024
)  # a single 1 MiB line stands in for the 200 MB one: anything over the limit takes the same path


def small_limit(**kw) -> CurateConfig:
    cfg = CurateConfig(num_workers=1, **kw)
    cfg.input.max_document_bytes = LIMIT
    return cfg


def reasons(out: Path) -> dict[str, str]:
    return {
        r["id"]: r["reason"] for r in map(json.loads, (out / "rejections.ndjson").read_text().splitlines())
    }


def kept_ids(out: Path) -> set[str]:
    return {json.loads(line)["id"] for f in out.glob("*/part-*.jsonl") for line in f.read_text().splitlines()}


def test_single_huge_line_is_counted_not_loaded(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "huge.txt").write_text("x" * BIG)  # one line, no newline at all
    (src / "huge.txt.gz").write_bytes(gzip.compress(b"y" * BIG))  # size unknown until decompressed
    lines = [
        json.dumps({"id": "before", "text": prose(1)}),
        json.dumps({"id": "huge", "text": "z" * BIG}),
        json.dumps({"id": "after", "text": prose(2)}),
    ]
    (src / "records.jsonl").write_text("\n".join(lines) + "\n")
    first2 = lines[0].replace('"before"', '"before2"').replace("the", "a")
    with gzip.open(src / "records2.jsonl.gz", "wt") as fh:
        fh.write("\n".join([first2, lines[1], json.dumps({"id": "after2", "text": prose(3)})]) + "\n")
    (src / "ok.md").write_text(prose(4))

    res = curate([src], tmp_path / "out", small_limit(), progress=False)
    r = reasons(tmp_path / "out")
    assert r == {
        "in/huge.txt": "oversized",
        "in/huge.txt.gz": "oversized",
        "in/records.jsonl#" + str(len(lines[0]) + 1): "oversized",
        "in/records2.jsonl.gz#" + str(len(first2) + 1): "oversized",
    }
    assert kept_ids(tmp_path / "out") == {"before", "after", "before2", "after2", "in/ok.md"}
    card = res.datacard
    assert card["rejections"]["oversized"]["documents"] == 4
    assert card["rejections"]["oversized"]["bytes"] == 2 * BIG + 2 * (
        len(lines[1]) + 1
    )  # every byte is accounted for
    assert card["documents"]["in"] == 9


def test_jsonl_split_into_byte_ranges_reads_every_line_once(tmp_path: Path) -> None:
    src = tmp_path / "big.jsonl"
    with open(src, "w") as fh:
        for i in range(300):
            fh.write(json.dumps({"id": f"r{i}", "text": prose(i, 60 + 40 * (i % 4))}) + "\n")
            if i % 50 == 0:
                fh.write("\n")  # blank lines are not documents
    cfg = CurateConfig(num_workers=1)
    sources, _, _ = list_sources([src], cfg)
    tasks = plan_tasks(sources, task_bytes=4096)  # ~40 ranges; most lines straddle a range edge
    assert len(tasks) > 30
    seen = [raw.doc_id for t in tasks for part in t for raw in iter_raw_docs(part, cfg, Opener(None))]
    whole = [
        raw.doc_id
        for part in plan_tasks(sources, task_bytes=10**9)[0]
        for raw in iter_raw_docs(part, cfg, Opener(None))
    ]
    assert seen == whole and len(whole) == 300
    a = curate([src], tmp_path / "a", CurateConfig(num_workers=1, task_bytes=4096), progress=False)
    b = curate([src], tmp_path / "b", CurateConfig(num_workers=1), progress=False)
    assert a.datacard["content_sha256"] == b.datacard["content_sha256"]
    assert a.datacard["documents"]["in"] == 300


def test_a_long_line_across_many_ranges(tmp_path: Path) -> None:
    src = tmp_path / "long.jsonl"
    src.write_text(
        json.dumps({"id": "a", "text": prose(1)})
        + "\n"
        + json.dumps({"id": "long", "text": "w " * 200_000})
        + "\n"
        + json.dumps({"id": "b", "text": prose(2)})
        + "\n"
    )
    res = curate([src], tmp_path / "out", small_limit(task_bytes=8192), progress=False)
    assert res.datacard["sources"]["work_units"] > 40
    assert kept_ids(tmp_path / "out") == {"a", "b"} and set(reasons(tmp_path / "out").values()) == {
        "oversized"
    }


def test_broken_gzip_and_unreadable_files_are_counted(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "truncated.txt.gz").write_bytes(gzip.compress(prose(6, 400).encode())[:60])
    (src / "notgzip.md.gz").write_bytes(b"plain text, not gzip data at all")
    good = "\n".join(json.dumps({"id": f"g{i}", "text": prose(100 + i)}) for i in range(30)) + "\n"
    (src / "part.jsonl.gz").write_bytes(gzip.compress(good.encode())[:-200])  # stream cut short mid-file
    (src / "fine.rst").write_text(prose(5))
    res = curate([src], tmp_path / "out", CurateConfig(num_workers=1), progress=False)
    r = reasons(tmp_path / "out")
    assert r["in/truncated.txt.gz"] == "read_error" and r["in/notgzip.md.gz"] == "read_error"
    assert r["in/part.jsonl.gz#error"] == "read_error"
    kept = kept_ids(tmp_path / "out")
    assert (
        "in/fine.rst" in kept and len({k for k in kept if k.startswith("g")}) >= 20
    )  # records before the damage survive
    assert len(res.datacard["errors"]) == 3 and all(str(src) in e for e in res.datacard["errors"])
    assert (
        res.datacard["documents"]["in"]
        == res.datacard["documents"]["kept"] + res.datacard["documents"]["rejected"]
    )


def test_listing_rules(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "sub").mkdir()
    (root / "sub" / "b.MD").write_text(prose(7))
    (root / "a.txt").write_text(prose(8))
    (root / "data.csv").write_text("a,b\n")
    cfg = CurateConfig()
    sources, _, _ = list_sources([root, root / "a.txt"], cfg)
    assert [(s.doc_id, s.kind, s.input_index) for s in sources] == [
        ("corpus/a.txt", "text", 0),
        ("corpus/data.csv", "unsupported", 0),
        ("corpus/sub/b.MD", "text", 0),
        ("a.txt", "text", 1),
    ]
    cfg.input.extensions = [".md"]
    sources, _, _ = list_sources([root], cfg)
    assert [s.kind for s in sources] == ["unsupported", "unsupported", "text"]


def test_exclude_patterns_leave_files_out_and_are_counted(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "howto").mkdir(parents=True)
    (root / "LICENSE-PSF.txt").write_text(prose(1))
    (root / "SOURCES.md").write_text(prose(2))
    (root / "guide.txt").write_text(prose(3))
    (root / "howto" / "LICENSE.txt").write_text(prose(4))  # a name pattern matches at any depth
    (root / "howto" / "sockets.txt").write_text(prose(5))
    cfg = CurateConfig(num_workers=1)
    cfg.input.exclude = ["LICENSE*", "SOURCES.md"]
    listing = list_sources([root], cfg)
    assert [s.doc_id for s in listing.sources] == ["corpus/guide.txt", "corpus/howto/sockets.txt"]
    assert listing.excluded == ["corpus/LICENSE-PSF.txt", "corpus/SOURCES.md", "corpus/howto/LICENSE.txt"]

    cfg.input.exclude = ["howto/*"]  # a pattern with "/" matches the path inside the input
    assert [s.doc_id for s in list_sources([root], cfg).sources] == [
        "corpus/LICENSE-PSF.txt",
        "corpus/SOURCES.md",
        "corpus/guide.txt",
    ]

    cfg.input.exclude = ["LICENSE*", "SOURCES.md"]
    res = curate([root], tmp_path / "out", cfg, progress=False)
    assert res.datacard["sources"] == {**res.datacard["sources"], "files": 2, "excluded_files": 3}
    assert res.datacard["documents"]["in"] == 2  # excluded files are not documents
    assert res.datacard["config"]["input"]["exclude"] == ["LICENSE*", "SOURCES.md"]


def test_excluding_every_file_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "LICENSE").write_text("licence text")
    cfg = CurateConfig()
    cfg.input.exclude = ["LICENSE"]
    with pytest.raises(UserError, match="excluded by input.exclude"):
        list_sources([root], cfg)
    with pytest.raises(ConfigError, match="exclude"):
        load(CurateConfig, overrides=["input.exclude=['']"])


@pytest.mark.parametrize("bad", ["s3://", "s3:///prefix"])
def test_malformed_s3_uri(bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_S3_ENDPOINT", "http://127.0.0.1:1")
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        curate([bad], tmp_path / "out", progress=False)
