"""What `lmforge run` records in its workdir, and the content digests the pipeline's lineage uses.

Two files, both written atomically (a temporary file renamed over the old one):
  run.json          the last run that succeeded; replaced only when another run succeeds
  run.partial.json  the run in progress, or the last one that failed or was interrupted (with the
                    error); removed when a run succeeds
so a failing run never destroys the record of the last good one. A record holds the resolved
config, the pipeline run id, the MLflow parent run, each task's status and time, the registered
model and the sample generations (`pipelines/local.py` fills it in).
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
VERSION = 2  # 2: the kfp.local pipeline's record (1 was the in-process sequence's)


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


# ---- the record ---------------------------------------------------------------------------------
class RunRecord:
    """The record of one run, kept in `run.partial.json` while it runs."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.path, self.partial_path = workdir / RECORD, workdir / PARTIAL
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
