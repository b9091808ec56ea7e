"""Shared inputs for the pretraining tests: token shards built from the repo's sample corpus
through the real tokenizer and tokenize stages, and a small-config builder.

The sample is the Python tutorial slice of data/sample (~290 kB of reStructuredText); a 512-token
byte-level BPE trained on it (well under a second) turns it into ~100k training tokens, enough for
the tiny model's loss to fall visibly within tens of steps and for no test run to wrap an epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.components.pretrain.config import PretrainConfig
from lmforge.components.tokenize_shards import tokenize_dataset
from lmforge.components.tokenizer import train_tokenizer
from lmforge.config import apply_overrides, build

REPO = Path(__file__).resolve().parents[2]
TUTORIAL = REPO / "data" / "sample" / "python-docs" / "tutorial"
VALIDATION_FILES = ("whatnow.rst.txt", "venv.rst.txt", "appendix.rst.txt")


def build_sample_shards(root: Path) -> Path:
    """tokenizer/ + curated/ + tokens/ under `root`; returns the token-shard directory."""
    files = sorted(TUTORIAL.glob("*.txt"))
    assert len(files) >= 10, f"sample corpus missing under {TUTORIAL}"
    tok = root / "tokenizer"
    train_tokenizer([TUTORIAL], tok, vocab_size=512, holdout_fraction=0.0, reference_tokenizers=[])
    curated = root / "curated"
    for split in ("train", "validation"):
        (curated / split).mkdir(parents=True)
        with open(curated / split / "part-00000.jsonl", "w") as fh:
            for path in files:
                if (path.name in VALIDATION_FILES) == (split == "validation"):
                    fh.write(json.dumps({"id": path.stem, "text": path.read_text()}) + "\n")
    tokenize_dataset(curated, tok, root / "tokens", progress=False)
    return root / "tokens"


def tiny_config(shards: Path, output_dir: Path, *overrides: str, **sections: Any) -> PretrainConfig:
    """A small, fast config (tiny preset with 1 layer unless overridden), validated the way the
    CLI validates YAML; `overrides` are `--set` strings, `sections` replace whole sections."""
    data: dict[str, Any] = {
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"preset": "tiny"},
        "data": {"shards_dir": str(shards), "seq_len": 64, "global_batch_size": 8, "micro_batch_size": 2},
        "optim": {"lr": 3e-3},
        "schedule": {"max_steps": 6, "warmup_steps": 2},
        "checkpoint": {"every": 2, "keep_last": 2},
        "eval": {"every": 3, "batches": 2},
        "tracking": {"log_every": 1, "enabled": False},
        "ray": {"num_workers": 0},
    }
    data.update(sections)
    return build(PretrainConfig, apply_overrides(data, list(overrides)))
