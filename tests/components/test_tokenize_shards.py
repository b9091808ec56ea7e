"""tokenize_dataset: curated JSONL splits -> flat token shards + index, read back losslessly.

The tokenizer is the tiny test tokenizer (`tokenizer_dir`, tests/conftest.py); byte-level BPE is
lossless, so decoding each document's tokens must give its text back exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.components.token_dataset import PackedTokenDataset
from lmforge.components.tokenize_shards import token_dtype, tokenize_dataset
from lmforge.errors import UserError

DOCS = {
    "train": [
        f"Document {i}: the scheduler retries failed jobs after {i} seconds. ünïcödé ✓" for i in range(40)
    ],
    "validation": [
        "A validation document about restarting services.",
        "Another one, with an e-mail [EMAIL].",
    ],
}


def write_curated(root: Path, docs: dict[str, list[str]], per_file: int = 15) -> Path:
    for split, texts in docs.items():
        (root / split).mkdir(parents=True)
        for n in range(0, len(texts), per_file):
            with open(root / split / f"part-{n // per_file:05d}.jsonl", "w") as fh:
                for i, text in enumerate(texts[n : n + per_file]):
                    fh.write(json.dumps({"id": f"{split}-{n + i}", "text": text}) + "\n")
    (root / "datacard.json").write_text(json.dumps({"content_sha256": "abc123"}))
    return root


def test_tokenize_round_trip_and_index(tmp_path: Path, tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    data = write_curated(tmp_path / "data", DOCS)
    res = tokenize_dataset(
        data, tokenizer_dir, tmp_path / "tok", shard_tokens=500, batch_docs=7, progress=False
    )
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|eos|>")
    index = json.loads((tmp_path / "tok" / "index.json").read_text())
    assert index["format"] == "lmforge-token-shards" and index["dtype"] == "uint16"
    assert (
        index["eos_id"] == eos == res.eos_id and index["vocab_size"] == tok.get_vocab_size() == res.vocab_size
    )
    assert (
        index["tokenizer_sha256"]
        == hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    )
    assert index["data_content_sha256"] == "abc123"
    assert list(index["splits"]) == ["train", "validation"]
    for split, texts in DOCS.items():
        entry = index["splits"][split]
        files = [tmp_path / "tok" / s["file"] for s in entry["shards"]]
        assert all(s["num_tokens"] <= 500 for s in entry["shards"])
        for s, f in zip(entry["shards"], files, strict=True):
            assert f.stat().st_size == 2 * s["num_tokens"]
            assert hashlib.sha256(f.read_bytes()).hexdigest() == s["sha256"]
        stream = np.concatenate([np.fromfile(f, dtype="<u2") for f in files]).astype(np.int64)
        assert len(stream) == entry["num_tokens"] == res.tokens[split]
        assert entry["num_documents"] == len(texts) == res.documents[split]
        assert stream[-1] == eos and (stream == eos).sum() == len(texts)  # one eos after each document
        pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == texts  # order and content preserved
    assert len(res.files["train"]) > 1  # small shard_tokens forced several shards

    ds = PackedTokenDataset(tmp_path / "tok", "train", seq_len=16)
    x, y = ds.next_batch(4)
    assert x.shape == (4, 16) and int(x.max()) < ds.vocab_size


def test_existing_output_needs_overwrite(tmp_path: Path, tokenizer_dir: Path) -> None:
    data = write_curated(tmp_path / "data", DOCS)
    tokenize_dataset(data, tokenizer_dir, tmp_path / "tok", progress=False)
    with pytest.raises(UserError, match="--overwrite"):
        tokenize_dataset(data, tokenizer_dir, tmp_path / "tok", progress=False)
    res = tokenize_dataset(data, tokenizer_dir, tmp_path / "tok", overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "tok").glob("*.bin")) == [
        "train-00000.bin",
        "validation-00000.bin",
    ]
    assert res.metrics()["total_documents"] == 42


def test_bad_inputs(tmp_path: Path, tokenizer_dir: Path) -> None:
    data = write_curated(tmp_path / "data", DOCS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenize_dataset(tmp_path / "missing", tokenizer_dir, tmp_path / "o1", progress=False)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenize_dataset(data, tmp_path, tmp_path / "o2", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no split subdirectories"):
        tokenize_dataset(tmp_path / "empty", tokenizer_dir, tmp_path / "o3", progress=False)
    bad_tok = tmp_path / "badtok"
    bad_tok.mkdir()
    (bad_tok / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (bad_tok / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(UserError, match="not in its vocabulary"):
        tokenize_dataset(data, bad_tok, tmp_path / "o4", progress=False)
    with open(data / "train" / "part-00000.jsonl", "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(UserError, match="part-00000.jsonl:16 is not valid JSON"):
        tokenize_dataset(data, tokenizer_dir, tmp_path / "o5", progress=False)
    assert not (tmp_path / "o5" / "index.json").exists()  # no index = no half-written dataset looks complete


def test_dtype_widens_only_when_ids_do_not_fit() -> None:
    assert token_dtype(50_000) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(128_256) == np.uint32


def test_curate_then_tokenize_through_the_cli(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    import lmforge.cli as cli
    from lmforge.components.curate import CurateConfig, curate

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "curate" / "docs"
    cfg = CurateConfig(num_workers=1)
    cfg.split.validation = cfg.split.test = 0.3
    curated = curate([fixture], tmp_path / "data", cfg, progress=False)
    rc = cli.main(
        [
            "tokenize",
            "--data",
            str(tmp_path / "data"),
            "--tokenizer",
            str(tokenizer_dir),
            "--output",
            str(tmp_path / "tokens"),
            "--no-progress",
        ]
    )
    assert rc == 0 and "tokenized train" in capsys.readouterr().out
    index = json.loads((tmp_path / "tokens" / "index.json").read_text())
    assert index["data_content_sha256"] == curated.datacard["content_sha256"]
    assert {s: e["num_documents"] for s, e in index["splits"].items()} == {
        s: v["documents"] for s, v in curated.datacard["splits"].items() if v["documents"]
    }
    ds = PackedTokenDataset(tmp_path / "tokens", "train", seq_len=32, seed=1)
    x, y = ds.next_batch(8)
    assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert (
        cli.main(
            [
                "tokenize",
                "--data",
                str(tmp_path / "data"),
                "--tokenizer",
                str(tmp_path / "nope"),
                "--output",
                str(tmp_path / "t2"),
            ]
        )
        == 2
    )
    assert "tokenizer.json" in capsys.readouterr().err
