"""Packed, memory-mapped training sequences over the token shards written by `lmforge tokenize`.

The training loop needs fixed-length (seq_len) sequences, a position it can checkpoint and resume
exactly, the same shuffled order every time for a given seed, and a disjoint share of the data per
data-parallel rank. This module gives that without loading the corpus into memory: each shard is a
`numpy.memmap`, and the split is read as ONE concatenated token stream (documents already separated
by the eos id), cut into windows of seq_len+1 tokens with stride seq_len (the extra token gives the
shifted target, so no token is wasted and no target crosses into an unseen position).

Order: epoch e visits the windows in `default_rng([seed, e]).permutation(...)` order (or in stream
order with shuffle=False). Sharding: of that order, the first `world_size * (windows // world_size)`
entries are dealt round-robin, rank r taking entries r, r+world_size, ... — disjoint, and every rank
has the same count, so DDP ranks stay in lockstep. Because the deal is round-robin, after `cursor`
steps the ranks together have consumed exactly the first `cursor * world_size` entries; the state is
therefore the same on every rank (saving rank 0's `state_dict()` is enough) and can even be carried
to a different world size.

Imports numpy and torch only (no ray/mlflow), so it runs inside any trainer.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.components.tokenize_shards import INDEX_FILE, INDEX_FORMAT, INDEX_VERSION
from lmforge.errors import InputNotFoundError, UserError

STATE_VERSION = 1


def read_index(shards_dir: str | Path) -> dict[str, Any]:
    """Read and check the index JSON of a token-shard directory (see `components.tokenize_shards`)."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise InputNotFoundError(
            f"token shards directory {shards_dir} does not exist (run `lmforge tokenize` first)"
        )
    path = shards_dir / INDEX_FILE
    if not path.is_file():
        raise InputNotFoundError(
            f"{path} not found: {shards_dir} is not a token-shard directory (run `lmforge tokenize`)"
        )
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise UserError(
            f"{path}: format must be {INDEX_FORMAT!r}, "
            f"got {index.get('format') if isinstance(index, dict) else index!r}"
        )
    if index.get("version") != INDEX_VERSION:
        raise UserError(
            f"{path}: unsupported index version {index.get('version')!r} (this lmforge reads {INDEX_VERSION})"
        )
    for key in ("dtype", "vocab_size", "eos_id", "splits"):
        if key not in index:
            raise UserError(f"{path}: missing field {key!r}")
    if index["dtype"] not in ("uint16", "uint32"):
        raise UserError(f"{path}: dtype must be uint16 or uint32, got {index['dtype']!r}")
    return index


class PackedTokenDataset:
    """Fixed-length sequences from one split of a token-shard directory; see the module docstring."""

    def __init__(
        self,
        shards_dir: str | Path,
        split: str,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        for name, value, low in (
            ("seq_len", seq_len, 1),
            ("world_size", world_size, 1),
            ("seed", seed, 0),
            ("rank", rank, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise UserError(f"rank must be < world_size ({world_size}), got {rank}")
        self.shards_dir = Path(shards_dir)
        index = read_index(self.shards_dir)
        splits = index["splits"]
        if split not in splits:
            raise UserError(
                f"split {split!r} not found in {self.shards_dir / INDEX_FILE}; available: {sorted(splits)}"
            )
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.dtype = np.dtype(index["dtype"])
        self.vocab_size: int = int(index["vocab_size"])
        self.eos_id: int = int(index["eos_id"])
        self.tokenizer_sha256: str | None = index.get("tokenizer_sha256")

        # One memmap per non-empty shard; offsets[i] = first stream position of shard i.
        self._shards: list[np.memmap] = []
        sizes: list[int] = []
        for entry in splits[split]["shards"]:
            path = self.shards_dir / entry["file"]
            n = int(entry["num_tokens"])
            if not path.is_file():
                raise InputNotFoundError(f"token shard {path} listed in the index is missing")
            actual = path.stat().st_size
            if actual != n * self.dtype.itemsize:
                raise UserError(
                    f"token shard {path} holds {actual} bytes but the index says "
                    f"{n} {self.dtype.name} tokens "
                    f"({n * self.dtype.itemsize} bytes): the shard is truncated or the index is stale"
                )
            if n:
                self._shards.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)))
                sizes.append(n)
        self._offsets = np.cumsum([0, *sizes], dtype=np.int64)
        self.num_tokens: int = int(self._offsets[-1])

        # Windows of seq_len+1 tokens, stride seq_len: window i covers [i*T, i*T + T + 1).
        self._num_windows = (self.num_tokens - 1) // seq_len if self.num_tokens > 0 else 0
        if self._num_windows < world_size:
            raise UserError(
                f"split {split!r} of {self.shards_dir} has {self.num_tokens} tokens: too few for "
                f"{world_size} sequence(s) of seq_len+1={seq_len + 1} tokens (one per rank); "
                f"lower seq_len or add data"
            )
        self.num_sequences: int = self._num_windows // world_size  # per rank, per epoch

        self.epoch = 0
        self.cursor = 0  # sequences of the current epoch this rank has consumed
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    # ---- order -----------------------------------------------------------------------------
    def _global_order(self, epoch: int) -> np.ndarray:
        """Window ids of one epoch for all ranks together (before the round-robin deal)."""
        used = self.num_sequences * self.world_size
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(self._num_windows)[:used]
        return np.arange(used, dtype=np.int64)

    def _rank_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = self._global_order(epoch)[self.rank :: self.world_size]
            self._order_epoch = epoch
        return self._order

    def _next_window(self) -> int:
        if self.cursor >= self.num_sequences:
            self.epoch += 1
            self.cursor = 0
        window = int(self._rank_order(self.epoch)[self.cursor])
        self.cursor += 1
        return window

    # ---- reading ---------------------------------------------------------------------------
    def _read_window(self, window: int, out: np.ndarray) -> None:
        """Copy tokens [window*T, window*T+T+1) of the stream into `out` (int64), across shard edges."""
        start = window * self.seq_len
        end = start + self.seq_len + 1
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        filled = 0
        while start < end:
            lo = start - int(self._offsets[shard])
            take = min(end - start, len(self._shards[shard]) - lo)
            out[filled : filled + take] = self._shards[shard][lo : lo + take]
            filled += take
            start += take
            shard += 1

    def _batch(self, windows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((len(windows), self.seq_len + 1), dtype=np.int64)  # (B, T+1)
        for b, window in enumerate(windows):
            self._read_window(window, rows[b])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # inputs (B, T), targets (B, T)

    # ---- public API --------------------------------------------------------------------------
    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `batch_size` sequences of this rank: (inputs, targets), each (B, T) int64.

        Crosses epoch boundaries transparently (a new shuffled order starts)."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        return self._batch([self._next_window() for _ in range(batch_size)])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Single sequences (inputs (T,), targets (T,)) forever, in the same order as `next_batch`
        and advancing the same position (so `state_dict()` stays exact)."""
        while True:
            x, y = self._batch([self._next_window()])
            yield x[0], y[0]

    def iter_eval_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One finite, unshuffled pass over this rank's share of the split (for validation).

        Does not touch the training position. Every rank yields the same number of batches (the
        last one may be smaller than `batch_size`), so distributed evaluation stays in lockstep."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        windows = np.arange(self.num_sequences * self.world_size, dtype=np.int64)[
            self.rank :: self.world_size
        ]
        for n, start in enumerate(range(0, len(windows), batch_size)):
            if max_batches is not None and n >= max_batches:
                return
            yield self._batch([int(w) for w in windows[start : start + batch_size]])

    def state_dict(self) -> dict[str, Any]:
        """The data position, JSON-serialisable and identical on every rank."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "world_size": self.world_size,
            "num_tokens": self.num_tokens,
            "epoch": self.epoch,
            "cursor": self.cursor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where `state_dict()` was taken: the following batches are identical.

        The data and ordering must match (same split, seq_len, seed, shuffle and token count) or a
        ValueError names the mismatch. A different world size is accepted: the position is mapped to
        the same point of the global order (exact when the old consumed count divides evenly)."""
        missing = [
            k
            for k in (
                "version",
                "split",
                "seq_len",
                "seed",
                "shuffle",
                "world_size",
                "num_tokens",
                "epoch",
                "cursor",
            )
            if k not in state
        ]
        if missing:
            raise UserError(f"dataset state is missing fields {missing}")
        if state["version"] != STATE_VERSION:
            raise UserError(
                f"dataset state version {state['version']!r} is not supported (expected {STATE_VERSION})"
            )
        for key in ("split", "seq_len", "seed", "shuffle", "num_tokens"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"dataset state does not match this dataset: {key} is {state[key]!r} in the state "
                    f"but {getattr(self, key)!r} here "
                    "(the data or the data config changed since the checkpoint)"
                )
        epoch, cursor, old_ws = int(state["epoch"]), int(state["cursor"]), int(state["world_size"])
        if epoch < 0 or cursor < 0 or old_ws < 1:
            raise UserError(
                f"dataset state has invalid position epoch={epoch} cursor={cursor} world_size={old_ws}"
            )
        if old_ws != self.world_size:
            consumed = cursor * old_ws
            cursor = min(consumed // self.world_size, self.num_sequences)
            if consumed % self.world_size:
                warnings.warn(
                    f"resuming with world_size={self.world_size} "
                    f"from a state saved with world_size={old_ws}: "
                    f"{consumed % self.world_size} sequence(s) of epoch {epoch} will be seen twice",
                    stacklevel=2,
                )
        elif cursor > self.num_sequences:
            raise UserError(
                f"dataset state cursor {cursor} exceeds the {self.num_sequences} sequences per epoch"
            )
        self.epoch, self.cursor = epoch, cursor
