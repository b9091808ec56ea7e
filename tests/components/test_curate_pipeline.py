"""curate() end to end on the fixture corpus (tests/fixtures/curate/docs, see SOURCES.md there):
exact accounting per document, redactions, markup and encoding handling, stable splits, the CLI."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from lmforge.components.curate import CurateConfig, curate
from lmforge.components.curate.split import assign_split
from lmforge.errors import UserError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "curate" / "docs"
TICKETS = FIXTURE / "kb" / "tickets.jsonl"


def _ticket_id(line_no: int) -> str:
    """The id curate gives a tickets.jsonl record that has no usable id: file id + '#' + byte offset."""
    lines = TICKETS.read_bytes().splitlines(keepends=True)
    return f"docs/kb/tickets.jsonl#{sum(len(line) for line in lines[:line_no])}"


EXPECTED_REJECTED = {
    "docs/corrupt.txt": "binary",
    "docs/empty.txt": "empty",
    "docs/whitespace.md": "empty",
    "docs/german.txt": "language",
    "docs/image.png": "unsupported_format",
    "docs/lorem.txt": "bad_phrase",
    "docs/repeated.txt": "duplicate_lines",
    "docs/short.txt": "too_few_words",
    "docs/table.txt": "alpha_fraction",
    "docs/tutorial_copy.rst": "exact_duplicate",
    "docs/tutorial_edited.rst": "near_duplicate",
    # kb/tickets.jsonl sorts first, so its copy (kb-002) is the one kept
    "docs/tutorial.rst": "exact_duplicate",
    "kb-007": "empty",
    _ticket_id(2): "invalid_json",
    _ticket_id(3): "missing_text",
}
EXPECTED_KEPT = {
    "docs/guide.md",
    "docs/interactive.html",
    "docs/notes.txt.gz",
    "kb-002",
    "docs/unicode-cp1252.txt",
    "kb-001",
    _ticket_id(5),
}
EXPECTED_PII = {"private_key": 1, "secret": 2, "email": 4, "ip_address": 2, "phone": 1}


def read_output(out: Path) -> dict[str, dict]:
    docs = {}
    for split in ("train", "validation", "test"):
        for f in sorted((out / split).glob("part-*.jsonl")):
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                assert rec["id"] not in docs
                docs[rec["id"]] = {**rec, "split": split}
    return docs


def read_rejections(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (out / "rejections.ndjson").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows)
    return {r["id"]: r["reason"] for r in rows}


def expected_bytes_in() -> int:
    """Raw bytes of every document: file sizes (gzip: uncompressed), JSONL: each non-blank line."""
    total = 0
    for f in FIXTURE.rglob("*"):
        if f.is_file() and not f.name.startswith(".") and f.suffix != ".jsonl":
            total += len(gzip.decompress(f.read_bytes())) if f.suffix == ".gz" else f.stat().st_size
    total += sum(len(line) for line in TICKETS.read_bytes().splitlines(keepends=True) if line.strip())
    return total


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curated")
    return curate([FIXTURE], out, CurateConfig(num_workers=1), overwrite=True, progress=False)


def test_every_document_is_kept_or_rejected_under_exactly_one_reason(run) -> None:
    card = run.datacard
    kept, rejected = read_output(run.output_dir), read_rejections(run.output_dir)
    assert set(kept) == EXPECTED_KEPT
    assert rejected == EXPECTED_REJECTED
    assert not set(kept) & set(rejected)
    assert card["documents"] == {"in": 22, "kept": 7, "rejected": 15}
    counts = {r: v["documents"] for r, v in card["rejections"].items() if v["documents"]}
    assert counts == dict(Counter(EXPECTED_REJECTED.values()))
    assert card["duplicates"] == {"exact": 2, "near": 1}
    assert card["bytes"]["in"] == expected_bytes_in()
    assert card["bytes"]["in"] == card["bytes"]["kept_raw"] + sum(
        v["bytes"] for v in card["rejections"].values()
    )
    assert card["bytes"]["out"] == sum(len(d["text"].encode()) for d in kept.values())
    assert card["inputs"] == [
        {"uri": str(FIXTURE), "files": 17, "documents": 22, "kept": 7}
    ]  # .hidden.txt is ignored
    assert card["sources"]["files"] == 17


def test_pii_is_replaced_by_typed_placeholders(run) -> None:
    docs = read_output(run.output_dir)
    assert run.datacard["pii_replacements"] == EXPECTED_PII
    guide = docs["docs/guide.md"]["text"]
    for placeholder in ("[EMAIL]", "[PHONE]", "[IP_ADDRESS]", "[SECRET]", "[PRIVATE_KEY]"):
        assert placeholder in guide
    for secret in (
        "support@example.com",
        "555-0100",
        "10.20.30.40",
        "2001:db8::8a2e:370:7334",
        "AKIAIOSFODNN7EXAMPLE",
        "s3cr3tV4lue9876543210",
        "BEGIN OPENSSH",
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ",
    ):
        assert not any(secret in d["text"] for d in docs.values()), secret
    assert "127.0.0.1" in guide  # loopback identifies nobody: kept
    assert 'api_key = "[SECRET]"' in guide  # the name stays, only the value goes
    assert docs[_ticket_id(5)]["text"].count("[EMAIL]") == 2


def test_markup_is_stripped_and_legacy_encodings_decoded(run) -> None:
    docs = read_output(run.output_dir)
    html = docs["docs/interactive.html"]["text"]
    assert html.startswith("Interactive Input Editing\n")  # the <title>
    assert "won't duplicate" in html and ">>> import readline" in html  # entities decoded, <pre> kept
    for gone in ("<", "trackingId", "font-family", "build 2024-05-01"):
        assert gone not in html
    cp1252 = docs["docs/unicode-cp1252.txt"]["text"]
    assert "Fichier non trouvé" in cp1252 and "répertoire" in cp1252 and "Gürzenichstraße" in cp1252
    assert run.datacard["encodings"]["cp1252"] == 1


def test_splits_follow_the_id_hash_and_are_stable_across_runs(run, tmp_path: Path) -> None:
    docs = read_output(run.output_dir)
    cfg = CurateConfig(num_workers=1)
    assert all(d["split"] == assign_split(i, cfg.split) for i, d in docs.items())
    again = curate([FIXTURE], tmp_path / "again", cfg, progress=False)
    assert again.datacard["content_sha256"] == run.datacard["content_sha256"]
    assert {i: d["split"] for i, d in read_output(tmp_path / "again").items()} == {
        i: d["split"] for i, d in docs.items()
    }
    # Growing the corpus never moves an existing document to another split.
    grown = tmp_path / "docs"
    shutil.copytree(FIXTURE, grown)
    (grown / "zz_extra.md").write_text(
        "Release notes for the internal platform: the deployment tool now checks the health of every service "
        "before it switches traffic, and the operators get an alert with the failing check and its logs.\n"
    )
    curate([grown], tmp_path / "grown", cfg, progress=False)
    grown_docs = read_output(tmp_path / "grown")
    assert "docs/zz_extra.md" in grown_docs
    assert all(grown_docs[i]["split"] == d["split"] for i, d in docs.items())


def test_other_split_fractions_change_assignment_deterministically(tmp_path: Path) -> None:
    cfg = CurateConfig(num_workers=1)
    cfg.split.validation, cfg.split.test = 0.45, 0.45
    res = curate([FIXTURE], tmp_path / "o", cfg, progress=False)
    splits = {s: v["documents"] for s, v in res.datacard["splits"].items()}
    expected = Counter(assign_split(i, cfg.split) for i in EXPECTED_KEPT)
    assert splits == {s: expected.get(s, 0) for s in ("train", "validation", "test")}
    assert sum(1 for n in splits.values() if n) >= 2


@pytest.mark.slow
def test_parallel_workers_and_small_work_units_give_identical_output(run, tmp_path: Path) -> None:
    cfg = CurateConfig(num_workers=2, task_bytes=2048)  # many work units, two processes
    res = curate([FIXTURE], tmp_path / "par", cfg, progress=False)
    assert res.datacard["sources"]["workers"] == 2 and res.datacard["sources"]["work_units"] > 4
    assert res.datacard["content_sha256"] == run.datacard["content_sha256"]
    assert read_rejections(tmp_path / "par") == EXPECTED_REJECTED


def test_datacard_files_and_config(run) -> None:
    card = json.loads(run.datacard_path.read_text())
    assert card["format"] == "lmforge-datacard" and card["version"] == 1
    assert card["config"]["dedup"]["jaccard_threshold"] == 0.8
    files = [f for s in ("train", "validation", "test") for f in card["splits"][s]["files"]]
    assert sum(f["documents"] for f in files) == 7
    md = run.datacard_md_path.read_text()
    assert (
        "| input | 22 |" in md
        and "| near_duplicate | dedup | 1 |" in md
        and "| email | `[EMAIL]` | 4 |" in md
    )
    assert card["content_sha256"] in md


def test_credentials_are_masked_in_the_datacard(tmp_path: Path) -> None:
    cfg = CurateConfig(num_workers=1)
    cfg.s3.access_key, cfg.s3.secret_key = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG"
    res = curate([FIXTURE / "guide.md"], tmp_path / "o", cfg, progress=False)
    text = res.datacard_path.read_text() + res.datacard_md_path.read_text()
    assert (
        "wJalrXUtnFEMI" not in text
        and "AKIDEXAMPLE" not in text
        and res.datacard["config"]["s3"]["secret_key"] == "***"
    )


def test_missing_input_is_an_error_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="input .*nope does not exist"):
        curate([FIXTURE, tmp_path / "nope"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no files"):
        curate([tmp_path / "empty"], tmp_path / "out", progress=False)


def test_existing_dataset_needs_overwrite(run, tmp_path: Path) -> None:
    out = tmp_path / "o"
    curate([FIXTURE / "guide.md"], out, CurateConfig(num_workers=1), progress=False)
    (out / "notes-by-user.txt").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        curate([FIXTURE / "guide.md"], out, progress=False)
    res = curate(
        [FIXTURE / "tutorial.rst"], out, CurateConfig(num_workers=1), overwrite=True, progress=False
    )  # kept alone
    assert set(read_output(out)) == {"tutorial.rst"} and res.datacard["documents"]["in"] == 1
    assert (out / "notes-by-user.txt").read_text() == "keep me"  # only our own files are replaced


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import lmforge.cli as cli

    out = tmp_path / "o"
    rc = cli.main(
        [
            "curate",
            "--input",
            str(FIXTURE),
            "--output",
            str(out),
            "--config",
            "configs/curate.yaml",
            "--set",
            "num_workers=1",
            "--set",
            "filters.min_words=2",
            "--no-progress",
        ]
    )
    assert rc == 0
    card = json.loads((out / "datacard.json").read_text())
    assert card["config"]["filters"]["min_words"] == 2
    assert card["rejections"]["too_few_words"]["documents"] == 0
    assert card["rejections"]["language"]["documents"] == 2  # "Hello world." now fails the next check instead
    assert "curated 22 documents" in capsys.readouterr().out
    assert cli.main(["curate", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "curate",
                "--input",
                str(FIXTURE),
                "--output",
                str(tmp_path / "o3"),
                "--set",
                "dedup.jaccard_threshold=2",
            ]
        )
        == 2
    )
    assert "jaccard_threshold" in capsys.readouterr().err


def test_cli_exclude_leaves_the_sample_licence_and_sources_out(
    repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The README / --help example: the bundled sample's LICENSE-PSF.txt and SOURCES.md are not documents."""
    import lmforge.cli as cli

    out = tmp_path / "o"
    argv = ["curate", "--input", str(repo_root / "data/sample"), "--exclude", "LICENSE*", "--exclude"]
    rc = cli.main([*argv, "SOURCES.md", "--output", str(out), "--set", "num_workers=1", "--no-progress"])
    assert rc == 0
    card = json.loads((out / "datacard.json").read_text())
    assert card["sources"]["excluded_files"] == 2
    assert card["config"]["input"]["exclude"] == ["LICENSE*", "SOURCES.md"]
    ids = {json.loads(line)["id"] for f in out.glob("*/part-*.jsonl") for line in f.read_text().splitlines()}
    ids |= {json.loads(line)["id"] for line in (out / "rejections.ndjson").read_text().splitlines()}
    assert ids and not any(i in ("sample/LICENSE-PSF.txt", "sample/SOURCES.md") for i in ids)
    assert "excluded: 2 files" in capsys.readouterr().out
