"""Inputs -> sources -> work units -> raw documents, streaming and in bounded memory.

Inputs are local files/folders and `s3://bucket/prefix` URIs. Every regular, non-hidden file under
a folder is a source; its extension (after an optional `.gz`) says how it is read:
  .txt .md .rst            one document per file
  .html .htm               one document per file, markup stripped later
  .jsonl                   one document per non-blank line (its `text` field)
  anything else            counted as one `unsupported_format` document, never opened
Document ids are stable across machines: `<input folder name>/<relative path>` (a file input: its
name), plus `#<byte offset>` for a JSONL line without an id field. Files matching `input.exclude`
are left out at listing time and only counted (`Listing.excluded`).

Memory is bounded by `input.max_document_bytes`: a bigger file, or a longer JSONL line, is counted
as `oversized` and skipped by streaming over it in 1 MiB chunks, never held whole. Large
uncompressed local JSONL files are split into byte ranges (`task_bytes`) so several workers share
them; a line belongs to the range where it starts.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, NamedTuple

from lmforge.components.curate.config import KNOWN_EXTENSIONS, CurateConfig
from lmforge.components.curate.normalize import is_binary
from lmforge.components.curate.s3 import S3Settings, list_objects, make_client, resolve_settings
from lmforge.errors import InputNotFoundError, UserError

CHUNK = 1 << 20
SNIFF = 8192
MAX_FILES_PER_TASK = 256


@dataclass(frozen=True)
class Source:
    uri: str  # absolute local path, or s3://bucket/key
    doc_id: str
    size: int  # bytes on disk / in the object store
    kind: str  # text | html | jsonl | unsupported
    gzipped: bool
    input_index: int  # which --input it came from


@dataclass(frozen=True)
class Part:
    """A source, or a byte range [start, end) of an uncompressed local JSONL source."""

    source: Source
    start: int = 0
    end: int | None = None


@dataclass
class RawDoc:
    doc_id: str
    source: Source
    raw_bytes: int  # bytes of the document as stored (see README: accounting)
    data: bytes | None  # file content (text/html) or one line (jsonl); None when rejected here
    reason: str | None = None  # set when the document is rejected while reading
    detail: str | None = None  # error text for read errors


def classify(name: str, extensions: Sequence[str]) -> tuple[str, bool]:
    lower = name.lower()
    gzipped = lower.endswith(".gz")
    if gzipped:
        lower = lower[:-3]
    ext = os.path.splitext(lower)[1]
    if ext in extensions and ext in KNOWN_EXTENSIONS:
        return KNOWN_EXTENSIONS[ext], gzipped
    return "unsupported", gzipped


# ---- listing (before any work starts) -------------------------------------------------------------
class Listing(NamedTuple):
    sources: list[Source]
    s3: S3Settings | None
    excluded: list[str]  # ids of the files left out by `input.exclude`


def is_excluded(relative_path: str, patterns: Sequence[str]) -> bool:
    """True if a pattern matches: one without "/" against the file name, one with "/" against the
    path inside the input (where `*` also crosses "/": `howto/*` is everything under howto/)."""
    name = relative_path.rsplit("/", 1)[-1]
    return any(fnmatchcase(relative_path if "/" in p else name, p) for p in patterns)


def list_sources(inputs: Sequence[str | os.PathLike], cfg: CurateConfig) -> Listing:
    """All sources of all inputs, in a deterministic order; a missing input is an error here."""
    if not inputs:
        raise UserError("no inputs given (pass --input PATH...)")
    settings: S3Settings | None = None
    client = None
    sources: list[Source] = []
    excluded: list[str] = []
    patterns = cfg.input.exclude
    for index, raw in enumerate(inputs):
        spec = str(raw)
        if spec.startswith("s3://"):
            if client is None:
                settings = resolve_settings(cfg.s3)
                client = make_client(settings)
            prefix = spec[5:].split("/", 1)[1] if "/" in spec[5:] else ""
            objects = list_objects(client, spec)
            base = prefix.rstrip("/")
            for b, key, size in objects:
                if any(part.startswith(".") for part in key.split("/")):
                    continue
                if key == base:
                    rel = doc_id = key.rsplit("/", 1)[-1]
                elif base:
                    rel = key[len(base) + 1 :]
                    doc_id = f"{base.rsplit('/', 1)[-1]}/{rel}"
                else:
                    rel, doc_id = key, f"{b}/{key}"
                if is_excluded(rel, patterns):
                    excluded.append(doc_id)
                    continue
                kind, gz = classify(key, cfg.input.extensions)
                sources.append(Source(f"s3://{b}/{key}", doc_id, size, kind, gz, index))
            continue
        path = Path(spec)
        if not path.exists():
            raise InputNotFoundError(f"input {spec} does not exist")
        if path.is_file():
            if is_excluded(path.name, patterns):
                excluded.append(path.name)
                continue
            kind, gz = classify(path.name, cfg.input.extensions)
            sources.append(Source(str(path.resolve()), path.name, path.stat().st_size, kind, gz, index))
        elif path.is_dir():
            root = path.resolve()
            files: list[tuple[str, Path]] = []
            left_out = 0
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    full = Path(dirpath) / name
                    if not name.startswith(".") and full.is_file():
                        rel = full.relative_to(root).as_posix()
                        if is_excluded(rel, patterns):
                            excluded.append(f"{root.name}/{rel}")
                            left_out += 1
                        else:
                            files.append((rel, full))
            # Sorted by relative path, exactly like an object store lists keys: the same corpus
            # read from a folder or from s3:// is processed in the same order (same survivors).
            for rel, full in sorted(files):
                kind, gz = classify(full.name, cfg.input.extensions)
                sources.append(Source(str(full), f"{root.name}/{rel}", full.stat().st_size, kind, gz, index))
            if not files:
                extra = f" (all {left_out} excluded by input.exclude)" if left_out else ""
                raise UserError(f"input folder {spec} holds no files{extra}")
        else:
            raise UserError(f"input {spec} is neither a file nor a folder")
    if not sources and excluded:
        raise UserError(f"every input file matches input.exclude ({len(excluded)} files): nothing to curate")
    return Listing(sources, settings, sorted(excluded))


def plan_tasks(sources: Sequence[Source], task_bytes: int) -> list[list[Part]]:
    """Group sources into work units of about `task_bytes` (deterministic: depends on config only)."""
    tasks: list[list[Part]] = []
    current: list[Part] = []
    size = 0
    for src in sources:
        splittable = src.kind == "jsonl" and not src.gzipped and not src.uri.startswith("s3://")
        if splittable and src.size > task_bytes:
            if current:
                tasks.append(current)
                current, size = [], 0
            for start in range(0, src.size, task_bytes):
                tasks.append([Part(src, start, min(start + task_bytes, src.size))])
            continue
        current.append(Part(src))
        size += src.size if src.kind != "unsupported" else 0
        if size >= task_bytes or len(current) >= MAX_FILES_PER_TASK:
            tasks.append(current)
            current, size = [], 0
    if current:
        tasks.append(current)
    return tasks


# ---- reading --------------------------------------------------------------------------------------
class Opener:
    """Opens sources as binary streams; holds the (per-process) S3 client."""

    def __init__(self, s3: S3Settings | None) -> None:
        self._settings = s3
        self._client = None

    def open(self, src: Source) -> IO[bytes]:
        if src.uri.startswith("s3://"):
            if self._client is None:
                if self._settings is None:
                    raise UserError(f"{src.uri}: no S3 settings")
                self._client = make_client(self._settings)
            bucket, key = src.uri[5:].split("/", 1)
            response = self._client.get_object(bucket, key)
            raw: IO[bytes] = _ResponseStream(response)
        else:
            raw = open(src.uri, "rb", buffering=CHUNK)
        if src.gzipped:
            return _OwningGzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
        return raw


class _OwningGzipFile(gzip.GzipFile):
    """A GzipFile that also closes the stream it decompresses (GzipFile(fileobj=...) does not)."""

    def close(self) -> None:
        inner = self.fileobj
        try:
            super().close()
        finally:
            if inner is not None:
                inner.close()


class _ResponseStream(io.BufferedReader):
    """A buffered reader over a urllib3 response that releases the connection on close."""

    def __init__(self, response) -> None:
        response.auto_close = False  # else urllib3 closes it at EOF and the buffer sees a "closed file"
        super().__init__(response, buffer_size=CHUNK)
        self._response = response

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._response.release_conn()


def _read_limited(fh: IO[bytes], limit: int) -> tuple[bytes | None, int]:
    """(content, size) if the stream holds at most `limit` bytes, else (None, size) after streaming
    over the rest without keeping it."""
    data = fh.read(limit + 1)
    if len(data) <= limit:
        return data, len(data)
    total = len(data)
    del data
    while chunk := fh.read(CHUNK):
        total += len(chunk)
    return None, total


def _iter_lines(
    fh: IO[bytes], start: int, end: int | None, limit: int
) -> Iterator[tuple[int, bytes | None, int]]:
    """(offset, line or None if longer than `limit`, bytes) for each line starting in [start, end)."""
    pos = start
    if start > 0:
        fh.seek(start - 1)
        pos = start - 1
        while True:  # skip the line that began before `start`: it belongs to the previous range
            chunk = fh.readline(CHUNK)
            pos += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                break
            if end is not None and pos >= end:
                return
    while end is None or pos < end:
        offset = pos
        line = fh.readline(limit + 1)
        if not line:
            return
        pos += len(line)
        if len(line) > limit and not line.endswith(b"\n"):
            total = len(line)
            del line
            while more := fh.readline(CHUNK):
                total += len(more)
                pos += len(more)
                if more.endswith(b"\n"):
                    break
            yield offset, None, total
        else:
            yield offset, line, len(line)


READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
try:  # network errors while streaming from S3
    from minio.error import S3Error
    from urllib3.exceptions import HTTPError

    READ_ERRORS += (S3Error, HTTPError)
except ImportError:  # pragma: no cover - minio is a dependency
    pass


def iter_raw_docs(part: Part, cfg: CurateConfig, opener: Opener) -> Iterator[RawDoc]:
    """The raw documents of one part; read problems become rejected documents, never exceptions."""
    src = part.source
    limit = cfg.input.max_document_bytes
    if src.kind == "unsupported":
        yield RawDoc(src.doc_id, src, src.size, None, "unsupported_format")
        return
    if src.kind != "jsonl":
        if src.size == 0:
            yield RawDoc(src.doc_id, src, 0, None, "empty")
            return
        if not src.gzipped and src.size > limit:
            yield RawDoc(src.doc_id, src, src.size, None, "oversized")  # known from the listing: never read
            return
        try:
            with opener.open(src) as fh:
                data, size = _read_limited(fh, limit)
        except READ_ERRORS as err:
            yield RawDoc(src.doc_id, src, src.size, None, "read_error", f"{src.uri}: {err}")
            return
        if data is None:
            yield RawDoc(src.doc_id, src, size, None, "oversized")
        elif not data:
            yield RawDoc(src.doc_id, src, 0, None, "empty")
        elif is_binary(data, cfg.normalize.binary_control_fraction):
            yield RawDoc(src.doc_id, src, size, None, "binary")
        else:
            yield RawDoc(src.doc_id, src, size, data)
        return

    # JSONL: one document per line of this part's byte range.
    consumed = 0
    try:
        with opener.open(src) as fh:
            head = os.pread(fh.fileno(), SNIFF, 0) if part.end is not None else fh.peek(SNIFF)[:SNIFF]
            if is_binary(head, cfg.normalize.binary_control_fraction):
                if part.start == 0:  # every range sees the same head; only the first reports it
                    yield RawDoc(src.doc_id, src, src.size, None, "binary")
                return
            for offset, line, size in _iter_lines(fh, part.start, part.end, limit):
                consumed += size
                doc_id = f"{src.doc_id}#{offset}"
                if line is None:
                    yield RawDoc(doc_id, src, size, None, "oversized")
                elif line.strip():
                    yield RawDoc(doc_id, src, size, line)
    except READ_ERRORS as err:
        rest = (
            max((part.end if part.end is not None else src.size) - part.start - consumed, 0)
            if not src.gzipped
            else 0
        )
        yield RawDoc(f"{src.doc_id}#error", src, rest, None, "read_error", f"{src.uri}: {err}")
