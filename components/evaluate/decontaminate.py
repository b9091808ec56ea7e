"""N-gram decontamination: how much of each evaluation item already appears in the training data.

The method of GPT-3 (Brown et al. 2020, appendix C) and lm-evaluation-harness's decontamination:
text is lowercased and cut into words (runs of letters/digits, so punctuation and markup do not
matter), every run of `n` consecutive words (13 by default) is an n-gram, and an item's overlap is
the share of its n-grams that also occur somewhere in the training split. An item counts as
contaminated when that share reaches a threshold.

The index holds one 64-bit hash per distinct training n-gram in a sorted numpy array (8 bytes per
n-gram; a lookup is a binary search), so a training split of 100M words needs ~0.8 GB instead of
the tens of GB a Python set of strings would. Hashes come from BLAKE2b of each word combined by a
polynomial over the n words, so they are the same in every process and on every machine; two
different n-grams share a hash with probability ~2^-64 per pair, negligible at these sizes.

Items shorter than `n` words have no n-gram: their overlap is 0.0 and `decontamination_report`
counts them under `too_short`, so a reader can see how much of a task could not be checked.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmforge.errors import InputNotFoundError, UserError

_WORD = re.compile(r"\w+")
_MULTIPLIER = np.uint64(0x100000001B3)  # odd, so the polynomial hash loses no bits


def words(text: str) -> list[str]:
    """The words n-grams are built from: lowercased runs of letters, digits and underscores."""
    return _WORD.findall(text.lower())


class _WordHasher:
    """Stable 64-bit hashes of words, cached because a corpus repeats its words constantly."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, tokens: list[str]) -> np.ndarray:
        cache = self._cache
        out = np.empty(len(tokens), dtype=np.uint64)
        for i, w in enumerate(tokens):
            h = cache.get(w)
            if h is None:
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                cache[w] = h
            out[i] = h
        return out


def _ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of `n` consecutive words: sum_k h[i+k] * M^(n-1-k) mod 2^64."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    out = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around arithmetic modulo 2^64 is the point
        for k in range(n):
            out = out * _MULTIPLIER + word_hashes[k : k + count]
    return out


class NgramIndex:
    """The distinct word n-grams of a training corpus, for overlap queries by evaluation items."""

    def __init__(self, hashes: np.ndarray, n: int, documents: int) -> None:
        self.hashes = hashes  # sorted, unique uint64
        self.n = n
        self.documents = documents
        self._hasher = _WordHasher()

    @classmethod
    def from_texts(cls, texts: Iterable[str], n: int = 13) -> NgramIndex:
        """Index the n-grams of `texts` (each text is one document: n-grams never span two)."""
        if not isinstance(n, int) or n < 1:
            raise UserError(f"decontamination n-gram size must be an integer >= 1, got {n!r}")
        hasher = _WordHasher()
        parts: list[np.ndarray] = []
        documents = 0
        pending = 0
        for text in texts:
            documents += 1
            grams = _ngram_hashes(hasher(words(text)), n)
            parts.append(grams)
            pending += len(grams)
            if pending > 4_000_000:  # dedupe as we go so memory tracks distinct n-grams
                parts = [np.unique(np.concatenate(parts))]
                pending = len(parts[0])
        hashes = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)
        index = cls(hashes, n, documents)
        index._hasher = hasher
        return index

    @classmethod
    def from_dataset(cls, train_dir: str | Path, n: int = 13, text_field: str = "text") -> NgramIndex:
        """Index a training split: a curated dataset folder (its `train/` split is used), a split
        folder of JSONL shards itself, or one JSONL file; each line's `text_field` is a document."""
        return cls.from_texts(_read_texts(Path(train_dir), text_field), n)

    def __len__(self) -> int:
        return len(self.hashes)

    def _found(self, text: str) -> tuple[int, int]:
        grams = _ngram_hashes(self._hasher(words(text)), self.n)
        if len(grams) == 0 or len(self.hashes) == 0:
            return 0, len(grams)
        pos = np.searchsorted(self.hashes, grams)
        pos[pos == len(self.hashes)] = 0
        return int(np.count_nonzero(self.hashes[pos] == grams)), len(grams)

    def overlap(self, text: str) -> float:
        """Share of the item's n-grams (counted with repeats) found in the training data; 0.0 for
        an item shorter than n words."""
        found, total = self._found(text)
        return found / total if total else 0.0

    def contaminated(self, text: str, threshold: float) -> bool:
        """True when the item's overlap reaches `threshold` (> 0); an item shorter than n words
        cannot be checked and is never reported contaminated."""
        if not 0.0 < threshold <= 1.0:
            raise UserError(f"decontamination threshold must be in (0, 1], got {threshold!r}")
        found, total = self._found(text)
        return bool(total) and found / total >= threshold


def decontamination_report(
    task_items: dict[str, list[str]], index: NgramIndex, threshold: float
) -> dict[str, dict[str, float | int]]:
    """Per task: items, contaminated items (overlap >= threshold), their share, and `too_short`
    (items with fewer than n words, which no n-gram test can check)."""
    report: dict[str, dict[str, float | int]] = {}
    for task, items in task_items.items():
        flagged = sum(index.contaminated(text, threshold) for text in items)
        short = sum(len(words(text)) < index.n for text in items)
        report[task] = {
            "items": len(items),
            "contaminated": flagged,
            "share": flagged / len(items) if items else 0.0,
            "too_short": short,
        }
    return report


# ---- reading a training split -----------------------------------------------------------------------
def _jsonl_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputNotFoundError(f"training data {path} does not exist")
    split = path / "train" if (path / "train").is_dir() else path
    files = sorted(split.rglob("*.jsonl"))
    if not files:
        raise UserError(f"training data {split} holds no *.jsonl file (expected a curated split folder)")
    return files


def _read_texts(path: Path, text_field: str) -> Iterator[str]:
    for file in _jsonl_files(path):
        with open(file, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{file}:{number}: not valid JSON ({err.msg})") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{file}:{number}: no string field {text_field!r}")
                yield text
