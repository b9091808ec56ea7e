"""The curated dataset on disk: `<output>/<split>/part-NNNNN.jsonl`, one JSON object per line:
{"id": <document id>, "text": <clean text>, "source": <id of the input file>}; and
`<output>/rejections.ndjson`, one JSON line per rejected document, so every exclusion can be audited.

Files roll over at `shard_bytes`; each file's SHA-256 is computed while writing, and the dataset's
`content_sha256` is the SHA-256 of the lines "<relative path> <file sha256>\\n" over all files in
split order (train, validation, test) — it changes if and only if some output byte changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import IO, Any

from lmforge.components.curate.split import SPLITS
from lmforge.errors import UserError

DATACARD_JSON = "datacard.json"
DATACARD_MD = "datacard.md"
# One {"id", "source", "reason", "bytes"[, "detail"]} line per rejected document. Not ".jsonl": tools
# that collect documents from *.jsonl files (e.g. tokenizer training on this folder) must not read it.
REJECTIONS = "rejections.ndjson"


def prepare_output(output_dir: Path, overwrite: bool) -> None:
    """Create the output folder; refuse to mix with an earlier dataset unless `overwrite`, in which
    case only the earlier dataset's own files (split folders, datacards) are removed."""
    owned = [output_dir / s for s in SPLITS] + [
        output_dir / n for n in (DATACARD_JSON, DATACARD_MD, REJECTIONS)
    ]
    existing = [p for p in owned if p.exists()]
    if existing and not overwrite:
        raise UserError(
            f"output folder {output_dir} already holds a curated dataset ({existing[0].name}); "
            "pass --overwrite to replace it"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


class SplitWriter:
    def __init__(self, output_dir: Path, shard_bytes: int) -> None:
        self.output_dir, self.shard_bytes = output_dir, shard_bytes
        self.files: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self._open: dict[str, tuple[IO[bytes], Any]] = {}

    def write(self, split: str, record: dict[str, str]) -> int:
        """Append one record; returns the bytes written."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        entries = self.files[split]
        if split not in self._open or entries[-1]["bytes"] >= self.shard_bytes:
            self._close(split)
            folder = self.output_dir / split
            folder.mkdir(exist_ok=True)
            name = f"{split}/part-{len(entries):05d}.jsonl"
            self._open[split] = (open(self.output_dir / name, "wb"), hashlib.sha256())
            entries.append({"path": name, "documents": 0, "bytes": 0, "sha256": ""})
        fh, digest = self._open[split]
        fh.write(line)
        digest.update(line)
        entries[-1]["documents"] += 1
        entries[-1]["bytes"] += len(line)
        return len(line)

    def _close(self, split: str) -> None:
        if split in self._open:
            fh, digest = self._open.pop(split)
            fh.close()
            self.files[split][-1]["sha256"] = digest.hexdigest()

    def finish(self) -> tuple[dict[str, list[dict[str, Any]]], str]:
        """Close everything; (files per split, content sha256 of the whole dataset)."""
        for split in list(self._open):
            self._close(split)
        content = hashlib.sha256()
        for split in SPLITS:
            for f in self.files[split]:
                content.update(f"{f['path']} {f['sha256']}\n".encode())
        return self.files, content.hexdigest()
