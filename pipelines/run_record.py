"""What `lmforge run` remembers between runs, in its workdir, and how it decides a step can be reused.

Two files, both written atomically (a temporary file renamed over the old one):
  run.json          the last run that succeeded; replaced only when another run succeeds
  run.partial.json  the run in progress, or the last one that failed or was interrupted (with the
                    error); removed when a run succeeds
so a failing run never destroys the record of the last good one.

Each step entry holds a *fingerprint*: the SHA-256 of the step's name, the lmforge version, its
resolved config and the content digests of its inputs (the upstream steps' outputs, or for curation
the input files themselves). A step is reused when an earlier entry has the same fingerprint and
its outputs are still on disk with the digest recorded then (`output_sha256`). Because a step's
inputs are its upstream outputs' digests, a change re-runs that step and every step whose inputs it
changes: in practice, everything after it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RECORD = "run.json"
PARTIAL = "run.partial.json"
FORMAT = "lmforge-run"
VERSION = 1
DONE = ("ran", "reused")  # step statuses whose outputs are complete


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` so a reader (or a crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---- digests ------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def files_digest(root: Path, relative_paths: Iterable[str]) -> str:
    """SHA-256 of the lines "<relative path> <file sha256>" (the datacard's content hash layout):
    it changes if and only if a file's bytes or the set of files changes."""
    digest = hashlib.sha256()
    for rel in relative_paths:
        digest.update(f"{rel} {file_sha256(root / rel)}\n".encode())
    return digest.hexdigest()


def tree_digest(root: Path) -> str:
    """`files_digest` over every regular, non-hidden file under `root`, in sorted order."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return files_digest(root, files)


def fingerprint(step: str, config: Any, inputs: dict[str, str | None]) -> str | None:
    """The step's identity; None (never reusable) when an input has no digest."""
    if any(v is None for v in inputs.values()):
        return None
    from lmforge import __version__

    text = json.dumps(
        {"step": step, "lmforge": __version__, "config": config, "inputs": inputs},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


# ---- the record ---------------------------------------------------------------------------------
def _read(path: Path) -> dict[str, Any] | None:
    """A record written by this version of lmforge, or None (missing, unreadable or another format)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        return None
    return data


class RunRecord:
    """The record of one run, kept in `run.partial.json` while it runs, plus the earlier records
    its steps may be reused from."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.path, self.partial_path = workdir / RECORD, workdir / PARTIAL
        # Newest first: an interrupted or failed attempt knows the current state of the workdir
        # better than the last successful run does.
        self._earlier = [r for r in (_read(self.partial_path), _read(self.path)) if r is not None]
        self.data: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "status": "running",
            "started_at": now(),
            "finished_at": None,
            "config": config,
            "steps": {},
        }

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        return self.data["steps"]

    def earlier(self, step: str) -> list[dict[str, Any]]:
        """Entries for `step` in earlier records, newest first."""
        return [r["steps"][step] for r in self._earlier if isinstance(r.get("steps", {}).get(step), dict)]

    def save(self) -> None:
        write_json_atomic(self.partial_path, self.data)

    def set_step(self, name: str, entry: dict[str, Any]) -> None:
        self.steps[name] = entry
        self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        """Close the run: on success `run.json` is replaced and the partial record removed; otherwise
        only the partial record is updated, and `run.json` still describes the last good run."""
        self.data["status"] = status
        self.data["finished_at"] = now()
        if error is not None:
            self.data["error"] = error
        if status == "succeeded":
            write_json_atomic(self.path, self.data)
            self.partial_path.unlink(missing_ok=True)
        else:
            self.save()
