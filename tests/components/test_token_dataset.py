"""PackedTokenDataset: packing, deterministic shuffling, rank sharding, exact resume, bad input.

The shards hold a known stream (token i = i mod 50000), so a window's content tells where it came
from; the shard size (37 tokens) is deliberately not a multiple of seq_len, so windows straddle
shard files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.components.token_dataset import PackedTokenDataset
from lmforge.components.tokenize_shards import INDEX_FORMAT, INDEX_VERSION, ShardWriter, write_index

SEQ = 8
STREAM_LEN = 8 * 50 + 3  # 403 tokens -> (403 - 1) // 8 = 50 windows


def make_shards(
    root: Path,
    n_tokens: int = STREAM_LEN,
    dtype: str = "uint16",
    splits=("train", "validation"),
    shard_tokens: int = 37,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    index_splits = {}
    for split in splits:
        writer = ShardWriter(root, split, np.dtype(dtype), shard_tokens)
        writer.write(np.arange(n_tokens, dtype=np.int64) % 50000 + (70000 if dtype == "uint32" else 0))
        index_splits[split] = {"num_tokens": n_tokens, "num_documents": 1, "shards": writer.finish()}
    write_index(
        root,
        {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "dtype": dtype,
            "vocab_size": 120000 if dtype == "uint32" else 50000,
            "eos_id": 0,
            "tokenizer_sha256": "x",
            "splits": index_splits,
        },
    )
    return root


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return make_shards(tmp_path / "tokens")


def window_ids(x: torch.Tensor) -> list[int]:
    """Window index of each row of an inputs batch (the stream is 0, 1, 2, ...)."""
    return [int(row[0]) // SEQ for row in x]


def test_windows_are_packed_shifted_and_cross_shards(shards: Path) -> None:
    ds = PackedTokenDataset(shards, "train", SEQ, shuffle=False)
    assert (ds.num_tokens, ds.num_sequences, ds.vocab_size, ds.eos_id) == (STREAM_LEN, 50, 50000, 0)
    assert ds.dtype == np.uint16
    x, y = ds.next_batch(50)
    assert x.shape == y.shape == (50, SEQ) and x.dtype == y.dtype == torch.int64
    expected = torch.arange(50 * SEQ).reshape(50, SEQ)
    assert torch.equal(x, expected)  # stride seq_len, in stream order, straddling 37-token shards
    assert torch.equal(y, expected + 1)  # targets = inputs shifted by one (the +1 token of each window)
    assert len(list(shards.glob("train-*.bin"))) == 11


def test_shuffled_epochs_cover_every_window_once_and_depend_on_seed(shards: Path) -> None:
    ds = PackedTokenDataset(shards, "train", SEQ, seed=3)
    epoch0 = window_ids(ds.next_batch(50)[0])
    epoch1 = window_ids(ds.next_batch(50)[0])
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != list(range(50)) and epoch0 != epoch1  # shuffled, and reshuffled per epoch
    assert ds.epoch == 1
    again = PackedTokenDataset(shards, "train", SEQ, seed=3)
    assert window_ids(again.next_batch(50)[0]) == epoch0  # deterministic from (seed, epoch)
    other = PackedTokenDataset(shards, "train", SEQ, seed=4)
    assert window_ids(other.next_batch(50)[0]) != epoch0


def test_iter_yields_same_order_as_next_batch(shards: Path) -> None:
    a = PackedTokenDataset(shards, "train", SEQ, seed=1)
    b = PackedTokenDataset(shards, "train", SEQ, seed=1)
    xb, yb = b.next_batch(60)  # crosses into epoch 1
    it = iter(a)
    for i in range(60):
        x, y = next(it)
        assert x.shape == (SEQ,) and torch.equal(x, xb[i]) and torch.equal(y, yb[i])
    assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_ranks_get_disjoint_equal_shares(shards: Path, world_size: int) -> None:
    seen: list[set[int]] = []
    for rank in range(world_size):
        ds = PackedTokenDataset(shards, "train", SEQ, seed=5, rank=rank, world_size=world_size)
        assert ds.num_sequences == 50 // world_size
        ids = window_ids(ds.next_batch(ds.num_sequences)[0])
        assert len(set(ids)) == len(ids)
        seen.append(set(ids))
    union = set().union(*seen)
    assert len(union) == sum(len(s) for s in seen) == world_size * (50 // world_size)  # no overlap


def test_resume_is_exact_across_epochs_and_json(shards: Path) -> None:
    ref = PackedTokenDataset(shards, "train", SEQ, seed=9, rank=1, world_size=2)
    run = PackedTokenDataset(shards, "train", SEQ, seed=9, rank=1, world_size=2)
    for _ in range(3):
        ref.next_batch(7)
        run.next_batch(7)
    state = json.loads(json.dumps(run.state_dict()))  # goes into a checkpoint as JSON
    resumed = PackedTokenDataset(shards, "train", SEQ, seed=9, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for _ in range(5):  # 21 + 35 > 25 per epoch: crosses two epoch boundaries
        xr, yr = ref.next_batch(7)
        xs, ys = resumed.next_batch(7)
        assert torch.equal(xr, xs) and torch.equal(yr, ys)
    assert resumed.state_dict() == ref.state_dict()
    assert resumed.epoch == 2


def test_state_is_rank_independent_and_maps_to_a_new_world_size(shards: Path) -> None:
    ranks = [PackedTokenDataset(shards, "train", SEQ, seed=2, rank=r, world_size=2) for r in range(2)]
    consumed: set[int] = set()
    for ds in ranks:
        consumed |= set(window_ids(ds.next_batch(6)[0]))
    assert ranks[0].state_dict() == ranks[1].state_dict()
    # Carry the position to 4 ranks: 12 consumed = 3 per rank, and the next windows are all new.
    four = [PackedTokenDataset(shards, "train", SEQ, seed=2, rank=r, world_size=4) for r in range(4)]
    nxt: set[int] = set()
    for ds in four:
        ds.load_state_dict(ranks[0].state_dict())
        assert ds.cursor == 3
        nxt |= set(window_ids(ds.next_batch(2)[0]))
    assert len(nxt) == 8 and not (nxt & consumed)


def test_eval_batches_are_finite_ordered_and_leave_position(shards: Path) -> None:
    ds = PackedTokenDataset(shards, "validation", SEQ, rank=0, world_size=3)
    ds.next_batch(2)
    before = ds.state_dict()
    batches = list(ds.iter_eval_batches(5))
    assert [len(x) for x, _ in batches] == [5, 5, 5, 1]  # 16 sequences per rank
    assert window_ids(torch.cat([x for x, _ in batches])) == list(range(0, 48, 3))
    assert len(list(ds.iter_eval_batches(5, max_batches=2))) == 2
    assert ds.state_dict() == before


def test_uint32_shards(tmp_path: Path) -> None:
    root = make_shards(tmp_path / "t32", dtype="uint32")
    ds = PackedTokenDataset(root, "train", SEQ, shuffle=False)
    x, _ = ds.next_batch(1)
    assert ds.dtype == np.uint32 and int(x[0, 0]) == 70000


def test_bad_input_is_a_clear_error(tmp_path: Path, shards: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PackedTokenDataset(tmp_path / "nope", "train", SEQ)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="index.json"):
        PackedTokenDataset(tmp_path / "empty", "train", SEQ)
    with pytest.raises(ValueError, match="split 'dev' not found.*'train', 'validation'"):
        PackedTokenDataset(shards, "dev", SEQ)
    with pytest.raises(ValueError, match="too few"):
        PackedTokenDataset(shards, "train", STREAM_LEN)
    with pytest.raises(ValueError, match="rank must be < world_size"):
        PackedTokenDataset(shards, "train", SEQ, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        PackedTokenDataset(shards, "train", 0)
    ds = PackedTokenDataset(shards, "train", SEQ, seed=1)
    with pytest.raises(ValueError, match="seed is 1 in the state but 2 here"):
        PackedTokenDataset(shards, "train", SEQ, seed=2).load_state_dict(ds.state_dict())
    with pytest.raises(ValueError, match="missing fields"):
        ds.load_state_dict({"epoch": 0})
    shard = shards / "train-00003.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        PackedTokenDataset(shards, "train", SEQ)


def test_module_does_not_import_services(repo_root: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, lmforge.components.token_dataset; "
        "print(sorted(m for m in ('ray', 'mlflow', 'kfp') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
