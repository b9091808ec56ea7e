"""AWQ-style activation-aware scaling (Lin et al., 2023), then round-to-nearest int4.

Input channels that carry large activations matter most; quantization error on their weights is
multiplied by those activations. AWQ multiplies each such weight column by s > 1 (so it is rounded
relatively more finely) and divides the layer's input by s, which costs nothing at inference
because the division is folded into the operation that produces the input: the RMSNorm gain for
q/k/v and gate/up, the rows of up_proj for down_proj, the rows of v_proj for o_proj (only without
grouped-query attention, where v rows map one-to-one onto o_proj columns), the final norm for the
output head. In float the model is unchanged; only what rounding loses changes.

Per group of layers sharing one input, s = mean|x|^alpha (normalised), with alpha picked from a
grid by the output error ||X W^T - X Q(W diag s)^T diag(1/s)|| on a sample of calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.components.quantize.calibration import InputStats
from lmforge.components.quantize.methods import Scheme, fake_quantize


@dataclass
class ScaleGroup:
    layers: list[str]  # Linear layers sharing one input
    fold_into: str  # the module producing that input: an RMSNorm, or a Linear whose rows are scaled


def scale_groups(model: nn.Module, quantized: set[str]) -> list[ScaleGroup]:
    cfg = model.config
    groups = []
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        groups.append(
            ScaleGroup([f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")], f"{p}.input_layernorm")
        )
        if cfg.n_kv_heads == cfg.n_heads:
            groups.append(ScaleGroup([f"{p}.self_attn.o_proj"], f"{p}.self_attn.v_proj"))
        groups.append(ScaleGroup([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.post_attention_layernorm"))
        groups.append(ScaleGroup([f"{p}.mlp.down_proj"], f"{p}.mlp.up_proj"))
    if "lm_head" in quantized:
        groups.append(ScaleGroup(["lm_head"], "model.norm"))
    return [g for g in groups if all(name in quantized for name in g.layers)]


def search_scale(
    weights: list[torch.Tensor], stats: InputStats, scheme: Scheme, grid: int = 20
) -> tuple[torch.Tensor, float, float]:
    """(s (in,), best alpha, error reduction vs alpha=0) for layers sharing one input."""
    x = stats.x  # (rows, in)
    act = stats.mean_abs.clamp(min=1e-6)
    refs = [x @ w.float().t() for w in weights]
    best: tuple[float, float, torch.Tensor] | None = None
    base = None
    for k in range(grid + 1):
        alpha = k / grid
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, refs, strict=True):
            wq = fake_quantize(w.float() * s, scheme) / s
            err += float((ref - x @ wq.t()).pow(2).mean())
        if base is None:
            base = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None and base is not None
    return best[2], best[1], (base - best[0]) / base if base > 0 else 0.0


@torch.no_grad()
def apply_awq(
    model: nn.Module, stats: dict[str, InputStats], quantized: set[str], scheme: Scheme
) -> dict[str, float]:
    """Scale the model's weights in place (float function unchanged); {first layer: chosen alpha}."""
    chosen = {}
    plans = []
    for group in scale_groups(model, quantized):
        weights = [model.get_submodule(n).weight for n in group.layers]
        s, alpha, _ = search_scale(weights, stats[group.layers[0]], scheme)
        plans.append((group, s))
        chosen[group.layers[0]] = alpha
    for group, s in plans:  # applied after every search: each search saw the original weights
        for name in group.layers:
            w = model.get_submodule(name).weight
            w.mul_(s.to(w.dtype))
        producer = model.get_submodule(group.fold_into)
        if isinstance(producer, nn.Linear):
            producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))  # its output rows = our input
        else:
            producer.weight.div_(s.to(producer.weight.dtype))  # an RMSNorm gain
    return chosen
