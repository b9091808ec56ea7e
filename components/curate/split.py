"""Deterministic document-level train/validation/test assignment.

A document's split depends only on (salt, document id): BLAKE2b of both, read as a number in
[0, 1), compared with the configured fractions. So the same document lands in the same split on
every run, on every machine, whatever else is added to or removed from the corpus — evaluation
data never leaks into training when the corpus grows. Change `split.salt` to draw a new split.
"""

from __future__ import annotations

import hashlib

from lmforge.components.curate.config import SplitConfig

SPLITS = ("train", "validation", "test")


def split_point(doc_id: str, salt: str) -> float:
    digest = hashlib.blake2b(f"{salt}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_split(doc_id: str, cfg: SplitConfig) -> str:
    u = split_point(doc_id, cfg.salt)
    if u < cfg.validation:
        return "validation"
    if u < cfg.validation + cfg.test:
        return "test"
    return "train"
