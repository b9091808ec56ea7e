"""Global unstructured magnitude pruning: one threshold over every prunable weight.

The `sparsity` fraction of the prunable weights with the smallest |w| is set to zero, compared
across all matrices together (Han et al., 2015; "global" in torch.nn.utils.prune's terms), so
layers that matter less lose more. The matrices keep their shapes: the saved model is an ordinary
dense model with zeros, loadable everywhere; the zeros pay off with sparse kernels or compression.

Prunable: the Linear weights of the transformer blocks (attention and MLP projections); with
`include_embeddings` also the embedding and an untied output head. Norm gains are never pruned.
"""

from __future__ import annotations

import torch

from lmforge.model.transformer import Transformer

BLOCK_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prunable_weights(model: Transformer, include_embeddings: bool = False) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter of every matrix magnitude pruning may zero (a tied head counted once)."""
    found: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        is_block = name.endswith(".weight") and module in BLOCK_MATRICES
        is_embedding = name in ("model.embed_tokens.weight", "lm_head.weight")
        if (is_block or (include_embeddings and is_embedding)) and id(param) not in seen:
            seen.add(id(param))
            found[name] = param
    return found


def global_threshold(weights: list[torch.Tensor], sparsity: float) -> float:
    """The |w| at or below which `sparsity` of all the given weights lie (the k-th smallest |w|)."""
    total = sum(w.numel() for w in weights)
    k = int(round(sparsity * total))
    if k <= 0:
        return -1.0
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights])
    return float(torch.kthvalue(flat, k).values)


@torch.no_grad()
def magnitude_prune(
    model: Transformer, sparsity: float, include_embeddings: bool = False
) -> dict[str, float]:
    """Zero the smallest-|w| `sparsity` fraction of the prunable weights, in place.

    Returns {"sparsity": reached over the prunable weights, "model_sparsity": over all parameters,
    "layer/<name>": each matrix's own}. Ties at the threshold are broken by position, so the
    reached sparsity equals the requested one up to one weight."""
    params = prunable_weights(model, include_embeddings)
    weights = list(params.values())
    threshold = global_threshold(weights, sparsity)
    total = sum(w.numel() for w in weights)
    budget = int(round(sparsity * total))  # weights to zero, exactly
    below = [(w.abs() < threshold) for w in weights]  # strictly below: always zeroed
    ties_left = budget - sum(int(m.sum()) for m in below)
    report: dict[str, float] = {}
    for (name, w), mask in zip(params.items(), below, strict=True):
        if ties_left > 0:  # zero weights equal to the threshold until the budget is spent
            tie = (w.abs() == threshold).flatten()
            idx = tie.nonzero().flatten()[:ties_left]
            flat = mask.flatten().clone()
            flat[idx] = True
            mask = flat.view_as(w)
            ties_left -= idx.numel()
        w.masked_fill_(mask, 0.0)
        report[f"layer/{name}"] = float(mask.float().mean())
    zeros = sum(int((w == 0).sum()) for w in weights)
    report["sparsity"] = zeros / total
    report["model_sparsity"] = sparsity_of(model)
    return report


def sparsity_of(model: torch.nn.Module) -> float:
    """Fraction of exactly-zero values over all (distinct) parameters."""
    seen: set[int] = set()
    zeros = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        zeros += int((p == 0).sum())
        total += p.numel()
    return zeros / max(total, 1)
