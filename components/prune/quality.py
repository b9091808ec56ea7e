"""Held-out quality on token shards: the mean next-token loss (nats/token) and perplexity.

Used by pruning and distillation to report what a compression cost, on the same split every time:
the first `batches` unshuffled batches of `split`, so two models are measured on identical tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.components.token_dataset import PackedTokenDataset

IGNORE_INDEX = -100


@torch.inference_mode()
def heldout_loss(
    model: nn.Module,
    shards_dir: str | Path,
    *,
    split: str = "validation",
    seq_len: int = 128,
    batches: int = 8,
    batch_size: int = 4,
) -> dict[str, float]:
    """{"loss": mean nats per scored token, "ppl": exp(loss), "tokens": scored tokens}."""
    data = PackedTokenDataset(shards_dir, split, seq_len, shuffle=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in data.iter_eval_batches(batch_size, max_batches=batches):
        logits = model(inputs.to(device))  # (B, T, V)
        losses = F.cross_entropy(
            logits.float().flatten(0, 1),
            targets.to(device).flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += float(losses)
        count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": float(count)}
