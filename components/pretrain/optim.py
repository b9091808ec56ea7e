"""AdamW parameter groups and the learning-rate schedule.

Parameter groups: every parameter is classified by kind (matrix, norm, bias, embedding) and by
depth (embedding = 0, block i = i + 1, final norm and head = L + 1). Kinds listed in
`optim.no_decay` get weight_decay 0; with layer-wise lr decay d, a parameter at depth k gets
lr * d**(L + 1 - k), so the head trains at the full rate and the embedding slowest. Parameters
sharing (decay, lr scale) go in one group, in model order, so the grouping is deterministic (the
optimizer state is saved and restored by position).

Schedule: linear warmup to the peak over `warmup_steps`, then cosine / linear decay (or constant)
to lr * min_lr_ratio at `max_steps`. `lr_multiplier(s)` is the factor for optimizer step s
(0-based), applied to every group's base lr through LambdaLR.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from lmforge.components.pretrain.config import OptimSection, ScheduleSection


def parameter_kind(name: str, param: nn.Parameter) -> str:
    """matrix | norm | bias | embedding, from the (Hugging Face Llama) parameter name."""
    if name.endswith("embed_tokens.weight"):
        return "embedding"
    if name.endswith(".bias"):
        return "bias"
    if "norm" in name.rsplit(".", 2)[-2] or param.dim() == 1:
        return "norm"
    return "matrix"


def parameter_depth(name: str, n_layers: int) -> int:
    """0 for the embedding, i + 1 for block i, n_layers + 1 for the final norm and the head."""
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) + 1
    if name.endswith("embed_tokens.weight"):
        return 0
    return n_layers + 1


def param_groups(model: nn.Module, n_layers: int, optim: OptimSection) -> list[dict]:
    """AdamW groups for `model` (tied parameters appear once, under their first name)."""
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = parameter_kind(name, param)
        decay = 0.0 if kind in optim.no_decay else optim.weight_decay
        scale = optim.layer_lr_decay ** (n_layers + 1 - parameter_depth(name, n_layers))
        key = (decay, scale)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": decay,
                "lr": optim.lr * scale,
                "lr_scale": scale,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_optimizer(groups: list[dict], optim: OptimSection, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the groups (the `names` lists are for inspection and stay out of the optimizer)."""
    return torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=fused or None,
    )


def lr_multiplier(step: int, schedule: ScheduleSection) -> float:
    """Factor of the peak lr for optimizer step `step` (0-based)."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant":
        return 1.0
    span = max(1, schedule.max_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    low = schedule.min_lr_ratio
    if schedule.decay == "cosine":
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - low) * progress  # linear


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleSection
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_multiplier, schedule=schedule))
