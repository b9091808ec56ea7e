"""Structured pruning: remove whole MLP channels and attention kv-groups, so the matrices shrink.

    MLP channel j (SwiGLU):   row j of gate_proj and up_proj, column j of down_proj
    kv-group g (GQA):         kv head g (its rows of k_proj and v_proj) with the G = n_heads / n_kv_heads
                              query heads that read it (their rows of q_proj, columns of o_proj)

Removing a whole kv-group keeps every remaining query head attached to its own kv head, so the
pruned model is again a plain grouped-query Llama: `n_kv_heads' = keep`, `n_heads' = keep * G`,
`head_dim` unchanged (written explicitly, since it no longer equals d_model / n_heads),
`intermediate_size' = kept channels`. A Llama config has one width for all layers, so every layer
keeps the same number of channels and groups, each layer choosing its own.

Scores (higher = kept), per layer:
  with calibration inputs (Wanda-style, Sun et al. 2023): mean |input| of each input column of
    down_proj / o_proj times that column's weight norm, summed over a group's columns;
  without: weight norms only, ||gate_j|| * ||up_j|| * ||down_:,j|| for a channel and
    ||o_proj columns of the group|| * ||v_proj rows of its kv head|| for a kv-group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import MLP, Attention, Transformer


def kept_count(total: int, sparsity: float, multiple_of: int = 1, minimum: int = 1) -> int:
    """How many of `total` units remain after removing `sparsity` of them (rounded to `multiple_of`)."""
    keep = total * (1.0 - sparsity)
    keep = int(round(keep / multiple_of)) * multiple_of
    return max(min(keep, total), minimum)


@torch.no_grad()
def input_activations(model: Transformer, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean |input| per input column of every o_proj and down_proj, over the calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith(("self_attn.o_proj", "mlp.down_proj")):

            def hook(mod, args, _name=name):
                x = args[0].detach().float().abs().flatten(0, -2)  # (tokens, in_features)
                sums[_name] = sums.get(_name, 0) + x.sum(0)
                counts[_name] = counts.get(_name, 0) + x.shape[0]

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for ids in batches:
            model(ids.to(device))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}


def _channel_scores(mlp: MLP, act: torch.Tensor | None) -> torch.Tensor:
    down_cols = mlp.down_proj.weight.float().norm(dim=0)  # (d_ff,)
    if act is not None:
        return act * down_cols
    return mlp.gate_proj.weight.float().norm(dim=1) * mlp.up_proj.weight.float().norm(dim=1) * down_cols


def _group_scores(attn: Attention, act: torch.Tensor | None) -> torch.Tensor:
    K, D = attn.n_kv_heads, attn.head_dim
    o_cols = attn.o_proj.weight.float().norm(dim=0)  # (H*D,) columns, head-major
    if act is not None:
        return (act * o_cols).view(K, -1).sum(-1)  # each group owns G*D consecutive columns
    o_group = attn.o_proj.weight.float().view(attn.o_proj.weight.shape[0], K, -1).pow(2).sum((0, 2)).sqrt()
    v_group = attn.v_proj.weight.float().view(K, D, -1).pow(2).sum((1, 2)).sqrt()
    return o_group * v_group


@torch.no_grad()
def structured_prune(
    model: Transformer,
    sparsity: float,
    *,
    mlp: bool = True,
    heads: bool = True,
    multiple_of: int = 1,
    calibration: Iterable[torch.Tensor] | None = None,
) -> tuple[Transformer, dict[str, float]]:
    """A new, smaller Transformer with `sparsity` of the MLP channels and/or kv-groups removed.

    Returns (model, report): the report has the shapes before and after and the fraction of
    parameters removed ("sparsity": of the block matrices, "model_sparsity": of all parameters)."""
    cfg = model.config
    assert cfg.n_kv_heads is not None and cfg.head_dim is not None and cfg.d_ff is not None
    group = cfg.n_heads // cfg.n_kv_heads
    ff_keep = kept_count(cfg.d_ff, sparsity, multiple_of) if mlp else cfg.d_ff
    kv_keep = kept_count(cfg.n_kv_heads, sparsity) if heads else cfg.n_kv_heads
    acts = input_activations(model, calibration) if calibration is not None else {}

    state = {k: v for k, v in model.state_dict().items()}
    for i, block in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        if ff_keep < cfg.d_ff:
            scores = _channel_scores(block.mlp, acts.get(prefix + "mlp.down_proj"))
            keep = scores.topk(ff_keep).indices.sort().values
            for name in ("gate_proj", "up_proj"):
                state[f"{prefix}mlp.{name}.weight"] = block.mlp.get_submodule(name).weight[keep].clone()
            state[f"{prefix}mlp.down_proj.weight"] = block.mlp.down_proj.weight[:, keep].clone()
        if kv_keep < cfg.n_kv_heads:
            attn = block.self_attn
            scores = _group_scores(attn, acts.get(prefix + "self_attn.o_proj"))
            kv = scores.topk(kv_keep).indices.sort().values  # kv heads kept
            q = (kv.unsqueeze(1) * group + torch.arange(group)).flatten()  # their query heads
            D, C = cfg.head_dim, cfg.d_model
            state[f"{prefix}self_attn.q_proj.weight"] = attn.q_proj.weight.view(cfg.n_heads, D, C)[q].reshape(
                -1, C
            )
            for name in ("k_proj", "v_proj"):
                w = attn.get_submodule(name).weight.view(cfg.n_kv_heads, D, C)
                state[f"{prefix}self_attn.{name}.weight"] = w[kv].reshape(-1, C).clone()
            o = attn.o_proj.weight.view(C, cfg.n_heads, D)
            state[f"{prefix}self_attn.o_proj.weight"] = o[:, q].reshape(C, -1).clone()

    new_cfg = dataclasses.replace(
        cfg, n_heads=kv_keep * group, n_kv_heads=kv_keep, head_dim=cfg.head_dim, d_ff=ff_keep
    )
    device = next(model.parameters()).device
    with torch.device("meta"):
        pruned = Transformer(new_cfg)
    if new_cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    pruned.load_state_dict(state, strict=False, assign=True)
    if new_cfg.tie_embeddings:
        pruned.lm_head.weight = pruned.model.embed_tokens.weight
    pruned.rotary.reset_tables(device)
    pruned.train(model.training)

    before, after = _block_params(cfg), _block_params(new_cfg)
    report = {
        "sparsity": 1.0 - after / before,
        "model_sparsity": 1.0 - new_cfg.num_params() / cfg.num_params(),
        "params_before": float(cfg.num_params()),
        "params_after": float(new_cfg.num_params()),
        "d_ff_before": float(cfg.d_ff),
        "d_ff_after": float(ff_keep),
        "n_heads_before": float(cfg.n_heads),
        "n_heads_after": float(new_cfg.n_heads),
        "n_kv_heads_before": float(cfg.n_kv_heads),
        "n_kv_heads_after": float(kv_keep),
    }
    return pruned, report


def _block_params(cfg: ModelConfig) -> int:
    """Parameters of the block matrices (attention + MLP projections, all layers)."""
    assert cfg.n_kv_heads is not None and cfg.head_dim is not None and cfg.d_ff is not None
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    return cfg.n_layers * (attn + 3 * cfg.d_model * cfg.d_ff)


def is_noop(cfg: ModelConfig, sparsity: float, mlp: bool, heads: bool, multiple_of: int) -> bool:
    """True when the requested sparsity removes nothing (too few units to round away one)."""
    assert cfg.n_kv_heads is not None and cfg.d_ff is not None
    ff_same = not mlp or kept_count(cfg.d_ff, sparsity, multiple_of) >= cfg.d_ff
    kv_same = not heads or kept_count(cfg.n_kv_heads, sparsity) >= cfg.n_kv_heads
    return ff_same and kv_same


__all__ = ["kept_count", "input_activations", "structured_prune", "is_noop"]
