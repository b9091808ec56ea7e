"""The per-document work done in the worker processes: raw bytes -> a decision + clean text.

decode -> (JSONL: parse, pick the text field) -> (HTML: strip markup) -> normalize -> quality
filters -> exact key + MinHash signature -> PII redaction. Deduplication needs the global view and
runs afterwards in the parent (pipeline.py), in input order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from lmforge.components.curate.config import CurateConfig
from lmforge.components.curate.dedup import Signer, exact_key
from lmforge.components.curate.filters import quality_reason
from lmforge.components.curate.markup import html_to_text
from lmforge.components.curate.normalize import decode, normalize_text
from lmforge.components.curate.pii import PII_TYPES, redact
from lmforge.components.curate.readers import Opener, Part, RawDoc, iter_raw_docs
from lmforge.components.curate.s3 import S3Settings


@dataclass(slots=True)
class DocResult:
    doc_id: str
    source_id: str  # the stable id of the file it came from
    input_index: int
    raw_bytes: int
    reason: str | None  # rejection reason, None if it passed the per-document stages
    text: str | None = None  # normalized + redacted text (when reason is None)
    key: bytes | None = None  # exact-dedup key
    signature: np.ndarray | None = None  # MinHash (uint32, num_perm)
    pii: tuple[int, ...] = ()  # replacements per PII_TYPES entry
    encoding: str | None = None  # how the bytes were decoded
    detail: str | None = None  # error message (read/processing errors)


class Processor:
    def __init__(self, cfg: CurateConfig, s3: S3Settings | None) -> None:
        self.cfg = cfg
        self.opener = Opener(s3)
        self.signer = Signer(cfg.dedup) if cfg.dedup.near else None

    def run_task(self, parts: list[Part]) -> list[DocResult]:
        return [self.process(raw) for part in parts for raw in iter_raw_docs(part, self.cfg, self.opener)]

    def process(self, raw: RawDoc) -> DocResult:
        src = raw.source
        result = DocResult(
            raw.doc_id, src.doc_id, src.input_index, raw.raw_bytes, raw.reason, detail=raw.detail
        )
        if raw.reason is not None:
            return result
        try:
            self._process(raw, result)
        except Exception as err:  # one pathological document must not end a long run; it is counted
            result.reason, result.text, result.signature = "processing_error", None, None
            result.detail = f"{raw.doc_id}: {type(err).__name__}: {err}"
        return result

    def _process(self, raw: RawDoc, out: DocResult) -> None:
        cfg = self.cfg
        assert raw.data is not None
        text, out.encoding = decode(raw.data, cfg.normalize)
        if text is None:
            out.reason = "undecodable"
            return
        if raw.source.kind == "jsonl":
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                out.reason = "invalid_json"
                return
            value = record.get(cfg.input.text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                out.reason = "missing_text"
                return
            record_id = record.get(cfg.input.id_field) if cfg.input.id_field else None
            if isinstance(record_id, (str, int)) and not isinstance(record_id, bool) and str(record_id):
                out.doc_id = str(record_id)
            text = value
        elif raw.source.kind == "html":
            text = html_to_text(text)
        text = normalize_text(text, cfg.normalize)
        if not text:
            out.reason = "empty"
            return
        reason = quality_reason(text, cfg.filters)
        if reason is not None:
            out.reason = reason
            return
        out.key = exact_key(text)
        if self.signer is not None:
            out.signature = self.signer.signature(text)
        out.text, counts = redact(text, cfg.pii)
        out.pii = tuple(counts[t] for t in PII_TYPES)


# ---- process-pool entry points (module level so they pickle under any start method) ---------------
_WORKER: Processor | None = None


def init_worker(cfg: CurateConfig, s3: S3Settings | None) -> None:
    global _WORKER
    _WORKER = Processor(cfg, s3)


def run_task(parts: list[Part]) -> list[DocResult]:
    assert _WORKER is not None, "init_worker was not called in this process"
    return _WORKER.run_task(parts)
