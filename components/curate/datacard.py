"""Accounting for a curation run and the datacard that reports it (`datacard.json` + `datacard.md`).

The ledger sees every input document exactly once, either kept (with its split) or rejected under
exactly one reason, so `documents.in == documents.kept + sum(rejections[*].documents)` and the same
for raw bytes; `finalize()` checks both before anything is written.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from lmforge.components.curate.filters import FILTER_REASONS
from lmforge.components.curate.output import DATACARD_JSON, DATACARD_MD
from lmforge.components.curate.pii import PII_TYPES, PLACEHOLDERS
from lmforge.components.curate.split import SPLITS

READ_REASONS = (
    "unsupported_format",
    "read_error",
    "oversized",
    "binary",
    "empty",
    "undecodable",
    "invalid_json",
    "missing_text",
    "processing_error",
)
DEDUP_REASONS = ("exact_duplicate", "near_duplicate")
STAGE = {
    **{r: "read" for r in READ_REASONS},
    **{r: "quality" for r in FILTER_REASONS},
    **{r: "dedup" for r in DEDUP_REASONS},
}
REASONS = READ_REASONS + FILTER_REASONS + DEDUP_REASONS
MAX_ERRORS = 50
DATACARD_FORMAT = "lmforge-datacard"
DATACARD_VERSION = 1


class Ledger:
    def __init__(self, inputs: list[str], files_per_input: list[int]) -> None:
        self.inputs = [
            {"uri": uri, "files": n, "documents": 0, "kept": 0}
            for uri, n in zip(inputs, files_per_input, strict=True)
        ]
        self.docs_in = self.bytes_in = 0
        self.kept = self.kept_raw_bytes = self.bytes_out = 0
        self.rejected = {r: [0, 0] for r in REASONS}  # reason -> [documents, raw bytes]
        self.pii = dict.fromkeys(PII_TYPES, 0)
        self.encodings: Counter[str] = Counter()
        self.splits = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
        self.errors: list[str] = []

    def _seen(self, input_index: int, raw_bytes: int, encoding: str | None, detail: str | None) -> None:
        self.docs_in += 1
        self.bytes_in += raw_bytes
        self.inputs[input_index]["documents"] += 1
        if encoding:
            self.encodings[encoding] += 1
        if detail and len(self.errors) < MAX_ERRORS:
            self.errors.append(detail)

    def reject(
        self,
        input_index: int,
        raw_bytes: int,
        reason: str,
        encoding: str | None = None,
        detail: str | None = None,
    ) -> None:
        if reason not in self.rejected:
            raise KeyError(f"unknown rejection reason {reason!r}")  # a bug: every reason is declared above
        self._seen(input_index, raw_bytes, encoding, detail)
        self.rejected[reason][0] += 1
        self.rejected[reason][1] += raw_bytes

    def keep(
        self,
        input_index: int,
        raw_bytes: int,
        split: str,
        text_bytes: int,
        pii: tuple[int, ...],
        encoding: str | None,
    ) -> None:
        self._seen(input_index, raw_bytes, encoding, None)
        self.kept += 1
        self.kept_raw_bytes += raw_bytes
        self.bytes_out += text_bytes
        self.inputs[input_index]["kept"] += 1
        self.splits[split]["documents"] += 1
        self.splits[split]["bytes"] += text_bytes
        for t, n in zip(PII_TYPES, pii, strict=True):
            self.pii[t] += n

    def finalize(
        self,
        files: dict[str, list[dict[str, Any]]],
        content_sha256: str,
        config: dict[str, Any],
        output_dir: Path,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        rejected_docs = sum(d for d, _ in self.rejected.values())
        rejected_bytes = sum(b for _, b in self.rejected.values())
        if self.docs_in != self.kept + rejected_docs or self.bytes_in != self.kept_raw_bytes + rejected_bytes:
            raise RuntimeError(  # an accounting bug, never a data problem
                f"datacard does not balance: in={self.docs_in}/{self.bytes_in}B, "
                f"kept={self.kept}/{self.kept_raw_bytes}B, "
                f"rejected={rejected_docs}/{rejected_bytes}B"
            )
        from lmforge import __version__

        return {
            "format": DATACARD_FORMAT,
            "version": DATACARD_VERSION,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "created_by": f"lmforge {__version__} curate",
            "output_dir": str(output_dir),
            "inputs": self.inputs,
            "documents": {"in": self.docs_in, "kept": self.kept, "rejected": rejected_docs},
            "bytes": {
                "in": self.bytes_in,
                "kept_raw": self.kept_raw_bytes,
                "rejected": rejected_bytes,
                "out": self.bytes_out,
            },
            "rejections": {
                r: {"stage": STAGE[r], "documents": d, "bytes": b} for r, (d, b) in self.rejected.items()
            },
            "duplicates": {
                "exact": self.rejected["exact_duplicate"][0],
                "near": self.rejected["near_duplicate"][0],
            },
            "pii_replacements": dict(self.pii),
            "encodings": dict(sorted(self.encodings.items())),
            "splits": {s: {**self.splits[s], "files": files[s]} for s in SPLITS},
            "content_sha256": content_sha256,
            "errors": self.errors,
            **(extra or {}),
            "config": config,
        }


def render_markdown(card: dict[str, Any]) -> str:
    d, b = card["documents"], card["bytes"]
    lines = [
        f"# Datacard: {Path(card['output_dir']).name}",
        "",
        f"Created {card['created_at']} by {card['created_by']}. Content SHA-256: `{card['content_sha256']}`.",
        "",
        "## Summary",
        "",
        "| | documents | bytes |",
        "|---|---:|---:|",
        f"| input | {d['in']:,} | {b['in']:,} |",
        f"| kept (as read) | {d['kept']:,} | {b['kept_raw']:,} |",
        f"| rejected | {d['rejected']:,} | {b['rejected']:,} |",
        f"| output text (clean, redacted) | {d['kept']:,} | {b['out']:,} |",
        "",
        "Every input document is either kept or counted under exactly one rejection reason.",
        "",
        "## Rejections",
        "",
        "| reason | stage | documents | bytes |",
        "|---|---|---:|---:|",
    ]
    for reason, r in card["rejections"].items():
        lines.append(f"| {reason} | {r['stage']} | {r['documents']:,} | {r['bytes']:,} |")
    lines += [
        "",
        f"Duplicates removed: {card['duplicates']['exact']:,} exact, {card['duplicates']['near']:,} near "
        f"(MinHash Jaccard >= {card['config']['dedup']['jaccard_threshold']}).",
        "",
        "## PII replacements",
        "",
        "| type | placeholder | replacements |",
        "|---|---|---:|",
    ]
    for t, n in card["pii_replacements"].items():
        lines.append(f"| {t} | `{PLACEHOLDERS[t]}` | {n:,} |")
    lines += ["", "## Splits", "", "| split | documents | text bytes | files |", "|---|---:|---:|---|"]
    for s, info in card["splits"].items():
        names = ", ".join(f"`{f['path']}`" for f in info["files"]) or "-"
        lines.append(f"| {s} | {info['documents']:,} | {info['bytes']:,} | {names} |")
    lines += ["", "## Inputs", "", "| input | files | documents | kept |", "|---|---:|---:|---:|"]
    for i in card["inputs"]:
        lines.append(f"| `{i['uri']}` | {i['files']:,} | {i['documents']:,} | {i['kept']:,} |")
    if card["encodings"]:
        lines += ["", "## Decoding", "", "| decoded as | documents |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in card["encodings"].items()]
    if card["errors"]:
        lines += ["", f"## Errors (first {MAX_ERRORS})", ""] + [f"- {e}" for e in card["errors"]]
    lines += [
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(card["config"], sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_datacard(output_dir: Path, card: dict[str, Any]) -> tuple[Path, Path]:
    json_path, md_path = output_dir / DATACARD_JSON, output_dir / DATACARD_MD
    md_path.write_text(render_markdown(card))
    json_path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")  # last: marks completion
    return json_path, md_path
