"""Tokenize a curated dataset into flat binary token shards + an index JSON (`lmforge tokenize`).

Input: a curated dataset directory (`lmforge curate` output): one subdirectory per split holding
JSONL shards (`part-*.jsonl`, optionally gzip'd) with a "text" field per line. Tokenizer: a
directory with a Hugging Face `tokenizer.json` and a `tokenizer_config.json` naming `eos_token`
(read with `lmforge.tokenizer_files.load_tokenizer` / `TokenizerInfo`, like every other stage).

Output (read by `components.token_dataset.PackedTokenDataset`):
    <output>/index.json                 what is where (format below)
    <output>/<split>-00000.bin, ...     raw little-endian uint16 (uint32 if the ids do not fit) ids:
                                        each document's tokens followed by the eos id, concatenated
index.json = {"format": "lmforge-token-shards", "version": 1, "dtype": "uint16", "vocab_size": V,
              "eos_id": E, "tokenizer_sha256": sha256(tokenizer.json), "tokenizer_dir": ...,
              "data_dir": ..., "data_content_sha256": (from the datacard, if any), "shard_tokens": N,
              "splits": {split: {"num_tokens", "num_documents",
                                 "shards": [{"file", "num_tokens", "sha256"}]}}}
A document may continue from one shard into the next: a split is one token stream, sharding only
bounds file sizes. The index is written last (atomically), so its presence marks a complete run.

Encoding uses `Tokenizer.encode_batch`, which spreads a batch over all cores (Rust threads), so the
Python side only reads JSON and writes bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from lmforge.errors import InputNotFoundError, UserError

INDEX_FILE = "index.json"
INDEX_FORMAT = "lmforge-token-shards"
INDEX_VERSION = 1
SPLIT_ORDER = ("train", "validation", "test")  # listed first, in this order; other split names follow sorted
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard
DEFAULT_BATCH_DOCS = 512


@dataclass
class TokenizeResult:
    output_dir: Path
    index_path: Path
    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer_sha256: str
    tokens: dict[str, int] = field(default_factory=dict)  # per split
    documents: dict[str, int] = field(default_factory=dict)  # per split
    files: dict[str, list[Path]] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        return {
            "total_tokens": sum(self.tokens.values()),
            "total_documents": sum(self.documents.values()),
            **{f"{s}_tokens": n for s, n in self.tokens.items()},
            **{f"{s}_documents": n for s, n in self.documents.items()},
        }


# ---- inputs --------------------------------------------------------------------------------------
def find_splits(data_dir: Path) -> dict[str, list[Path]]:
    """Split name -> its JSONL shard files (sorted), for every subdirectory that holds some."""
    found: dict[str, list[Path]] = {}
    for sub in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.iterdir() if f.is_file() and f.name.endswith((".jsonl", ".jsonl.gz")))
        if files:
            found[sub.name] = files
    ordered = [s for s in SPLIT_ORDER if s in found] + [s for s in found if s not in SPLIT_ORDER]
    return {s: found[s] for s in ordered}


def iter_texts(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{path}:{lineno} is not valid JSON ({err}); is {path.parent.parent} a curated dataset?"
                ) from err
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno} has no string 'text' field")
            yield text


def read_tokenizer(tokenizer_dir: str | Path):
    """The tokenizer, its eos token id and the sha256 of tokenizer.json. Every document ends with the
    eos token, so a tokenizer without one is refused."""
    from lmforge.components.tokenizer import TokenizerInfo
    from lmforge.tokenizer_files import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    info = TokenizerInfo.from_dir(tokenizer_dir, tokenizer)
    sha = hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()
    return tokenizer, info.eos_id, sha


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id (0..vocab_size-1) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---- output --------------------------------------------------------------------------------------
class ShardWriter:
    """Appends token arrays to `<split>-NNNNN.bin` files, starting a new file every `shard_tokens`."""

    def __init__(self, output_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.output_dir, self.split, self.dtype, self.shard_tokens = output_dir, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._fh: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._count = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh = open(self.output_dir / name, "wb")
        self._hash, self._count = hashlib.sha256(), 0
        self.shards.append({"file": name, "num_tokens": 0, "sha256": ""})

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.shards[-1].update(num_tokens=self._count, sha256=self._hash.hexdigest())
            self._fh = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<"))
        while len(tokens):
            if self._fh is None or self._count >= self.shard_tokens:
                self._close()
                self._open()
            take = min(len(tokens), self.shard_tokens - self._count)
            chunk = tokens[:take].tobytes()
            self._fh.write(chunk)
            self._hash.update(chunk)
            self._count += take
            tokens = tokens[take:]

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


def write_index(output_dir: Path, index: dict[str, Any]) -> Path:
    """Write index.json atomically (temp file + rename): its presence means the shards are complete."""
    path = output_dir / INDEX_FILE
    tmp = output_dir / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _prepare_output(output_dir: Path, overwrite: bool) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    old_index = output_dir / INDEX_FILE
    old_bins = sorted(output_dir.glob("*.bin"))
    if (old_index.exists() or old_bins) and not overwrite:
        raise UserError(
            f"output directory {output_dir} already holds token shards; pass --overwrite to replace them"
        )
    old_index.unlink(missing_ok=True)
    for f in old_bins:  # only our own artifact type; other files are left alone
        f.unlink()


# ---- the stage -----------------------------------------------------------------------------------
def tokenize_dataset(
    data_dir: str | Path,
    tokenizer_dir: str | Path,
    output_dir: str | Path,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_docs: int = DEFAULT_BATCH_DOCS,
    overwrite: bool = False,
    progress: bool = True,
) -> TokenizeResult:
    """Encode every split of `data_dir` with the tokenizer in `tokenizer_dir` into token shards."""
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if shard_tokens <= 0:
        raise UserError(f"shard_tokens must be positive, got {shard_tokens}")
    if batch_docs <= 0:
        raise UserError(f"batch_docs must be positive, got {batch_docs}")
    if not data_dir.is_dir():
        raise InputNotFoundError(f"dataset directory {data_dir} does not exist (run `lmforge curate` first)")
    splits = find_splits(data_dir)
    if not splits:
        raise UserError(
            f"dataset directory {data_dir} has no split subdirectories with *.jsonl files "
            f"(expected e.g. {data_dir}/train/part-00000.jsonl)"
        )
    tokenizer, eos_id, tok_sha = read_tokenizer(tokenizer_dir)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    _prepare_output(output_dir, overwrite)

    from tqdm import tqdm

    result = TokenizeResult(output_dir, output_dir / INDEX_FILE, dtype.name, vocab_size, eos_id, tok_sha)
    index_splits: dict[str, Any] = {}
    eos = np.array([eos_id], dtype=np.int64)
    bar = tqdm(unit="doc", desc="tokenize", disable=not progress, file=sys.stderr)
    try:
        for split, files in splits.items():
            writer = ShardWriter(output_dir, split, dtype, shard_tokens)
            n_docs = n_tokens = 0
            for path in files:
                batch: list[str] = []
                for text in itertools.chain(iter_texts(path), [None]):  # None flushes the last batch
                    if text is not None:
                        if text:
                            batch.append(text)
                        if len(batch) < batch_docs:
                            continue
                    if batch:
                        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
                        # doc_0 eos doc_1 eos ...: one array per batch keeps the write loop in numpy
                        tokens = np.concatenate(
                            [p for e in encodings for p in (np.asarray(e.ids, dtype=np.int64), eos)]
                        )
                        writer.write(tokens)
                        n_docs += len(batch)
                        n_tokens += len(tokens)
                        bar.update(len(batch))
                        batch = []
            shards = writer.finish()
            index_splits[split] = {"num_tokens": n_tokens, "num_documents": n_docs, "shards": shards}
            result.tokens[split], result.documents[split] = n_tokens, n_docs
            result.files[split] = [output_dir / s["file"] for s in shards]
    finally:
        bar.close()

    datacard = data_dir / "datacard.json"
    data_hash = json.loads(datacard.read_text()).get("content_sha256") if datacard.is_file() else None
    write_index(
        output_dir,
        {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "tokenizer_sha256": tok_sha,
            "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
            "data_dir": str(data_dir.resolve()),
            "data_content_sha256": data_hash,
            "shard_tokens": shard_tokens,
            "splits": index_splits,
        },
    )
    return result
