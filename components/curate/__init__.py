"""Data curation: raw company documents -> a clean, deduplicated, PII-redacted, documented dataset.

    from lmforge.components.curate import CurateConfig, curate
    result = curate(["docs/", "s3://bucket/prefix"], "out/data", CurateConfig())

One module per job: readers (inputs), normalize (decoding + text cleanup), markup (HTML), filters
(quality heuristics), dedup (exact + MinHash LSH), pii (redaction), split (stable assignment),
output (JSONL shards), datacard (accounting), process (per-document work in the workers),
pipeline (orchestration). The `lmforge curate` command and `lmforge run` both call `curate`.
"""

from lmforge.components.curate.config import CurateConfig
from lmforge.components.curate.pipeline import CurateResult, curate

__all__ = ["CurateConfig", "CurateResult", "curate"]
