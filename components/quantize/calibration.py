"""Calibration sequences for the calibrated methods (int4-awq, int4-gptq).

`--calibration` names either a token-shard directory (`lmforge tokenize` output: its train split,
else its first split) or curated text: a JSONL file / a directory of JSONL files with a "text"
field (e.g. a curated split), tokenized with the model directory's own tokenizer. Either way the
result is `num_sequences` windows of `seq_len` tokens; fewer than `min_sequences` is an error,
because statistics from a handful of sequences do not describe the model's inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.errors import InputNotFoundError, UserError


class CalibrationError(UserError):
    """Calibration data is missing, unreadable, or too short."""


def load_calibration(
    source: str | Path | None,
    model_dir: str | Path,
    *,
    num_sequences: int,
    seq_len: int,
    min_sequences: int,
    vocab_size: int,
) -> torch.Tensor:
    """(n, seq_len) int64 token ids, min_sequences <= n <= num_sequences."""
    if source is None:
        raise CalibrationError(
            "this method is calibrated: pass --calibration (a token-shard directory from `lmforge tokenize` "
            "or a curated split of JSONL text)"
        )
    path = Path(source)
    if not path.exists():
        raise InputNotFoundError(f"calibration data {path} does not exist")
    if (path / "index.json").is_file():
        ids = _from_shards(path, seq_len, num_sequences)
    else:
        ids = _from_text(path, model_dir, seq_len, num_sequences)
    if ids.shape[0] < min_sequences:
        raise CalibrationError(
            f"calibration data {path} gives only {ids.shape[0]} sequence(s) of {seq_len} tokens; "
            f"at least {min_sequences} are needed (add text, or lower quantize.seq_len / min_sequences)"
        )
    if int(ids.max()) >= vocab_size:
        raise CalibrationError(
            f"calibration data {path} holds token id {int(ids.max())} >= the model's vocabulary size "
            f"{vocab_size}: it was tokenized with another tokenizer"
        )
    return ids


def _from_shards(path: Path, seq_len: int, num_sequences: int) -> torch.Tensor:
    from lmforge.components.token_dataset import PackedTokenDataset, read_index

    splits = read_index(path)["splits"]
    split = "train" if "train" in splits else sorted(splits)[0]
    try:
        data = PackedTokenDataset(path, split, seq_len, shuffle=True, seed=0)
    except UserError as err:
        raise CalibrationError(f"calibration data {path}: {err}") from None
    n = min(num_sequences, data.num_sequences)
    return data.next_batch(n)[0] if n else torch.empty(0, seq_len, dtype=torch.long)


def _from_text(path: Path, model_dir: str | Path, seq_len: int, num_sequences: int) -> torch.Tensor:
    from lmforge.tokenizer_files import load_tokenizer

    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise CalibrationError(
            f"calibration data {path} holds no *.jsonl files (and no token-shard index.json)"
        )
    tokenizer = load_tokenizer(model_dir)
    stream: list[int] = []
    need = num_sequences * seq_len
    for file in files:
        with open(file, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CalibrationError(
                        f"{file}:{lineno} is not a JSON object with a 'text' field"
                    ) from None
                stream.extend(tokenizer.encode(text).ids)
                if len(stream) >= need:
                    break
        if len(stream) >= need:
            break
    n = min(num_sequences, len(stream) // seq_len)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ---- activation statistics ------------------------------------------------------------------
class InputStats:
    """What the calibrated methods need to know about one Linear layer's inputs."""

    def __init__(self, in_features: int, max_rows: int, hessian: bool) -> None:
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.rows = 0
        self.max_rows = max_rows
        self.sample: list[torch.Tensor] = []  # up to max_rows input rows, for measuring output error
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0).double()
        self.rows += x.shape[0]
        have = sum(s.shape[0] for s in self.sample)
        if have < self.max_rows:
            self.sample.append(x[: self.max_rows - have].clone())
        if self.hessian is not None:
            self.hessian += (x.t() @ x).double()

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()

    @property
    def x(self) -> torch.Tensor:
        return torch.cat(self.sample)

    @property
    def h(self) -> torch.Tensor:
        """2/N * X^T X, the GPTQ proxy Hessian of the layer's squared output error."""
        assert self.hessian is not None
        return (2.0 * self.hessian / max(self.rows, 1)).float()


@torch.no_grad()
def collect_input_stats(
    model: torch.nn.Module,
    ids: torch.Tensor,
    names: list[str],
    *,
    batch_size: int = 8,
    max_rows: int = 2048,
    hessian: bool = False,
) -> dict[str, InputStats]:
    """Run the calibration sequences through the (float) model once, recording each named Linear's
    inputs: mean |x| per input channel, a sample of rows, and optionally X^T X."""
    modules = {name: model.get_submodule(name) for name in names}
    stats = {name: InputStats(m.in_features, max_rows, hessian) for name, m in modules.items()}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, _name=name: stats[_name].add(args[0]))
        for name, m in modules.items()
    ]
    try:
        for start in range(0, ids.shape[0], batch_size):
            model(ids[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return stats
