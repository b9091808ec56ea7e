"""GPTQ-style error compensation (Frantar et al., 2022) for one Linear layer.

Columns are quantized left to right; the rounding error of each column is spread over the columns
not yet quantized, weighted by the inverse of H = 2/N X^T X (the curvature of the layer's squared
output error over the calibration inputs X), so later columns absorb what earlier ones lost. Group
scales/zero points are taken from the (already compensated) weights when their group starts. Lazy
block updates as in the paper; the Cholesky factor of H^-1 gives the row updates.

`act_order=True` visits the columns in decreasing order of diag(H) (the inputs with the most
activation energy first, while the most unquantized columns remain to absorb their error) with
*static* groups: each group's scale/zero point is fixed from the original weights before the pass,
so groups stay contiguous on disk and the stored layout (no g_idx) is the same as without it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.components.quantize.methods import Scheme, qparams


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    h: torch.Tensor,
    scheme: Scheme,
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale (out, groups), zero_point int8 (out, groups))."""
    w = weight.detach().float().clone()
    out, cols = w.shape
    gs = scheme.group_size or cols
    block = max(gs, (block // gs) * gs) if gs <= block else gs  # whole groups per block
    h = h.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols)
    if act_order:
        return _gptq_act_order(w, h, scheme, gs, block)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    groups = cols // gs
    scales = torch.zeros(out, groups)
    zps = torch.zeros(out, groups, dtype=torch.int8)

    def group_params(col: int, w1: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's scale/zero point from the compensated weights, when the group starts."""
        g = col // gs
        if col % gs == 0:
            scale, zp = qparams(w1[:, i : i + gs], Scheme(scheme.bits, None, scheme.symmetric))
            scales[:, g], zps[:, g] = scale[:, 0], zp[:, 0]
        return scales[:, g], zps[:, g].float()

    return _compensate(w, hinv, scheme, block, group_params), scales, zps


def _compensate(
    w: torch.Tensor,
    hinv: torch.Tensor,
    scheme: Scheme,
    block: int,
    params: Callable[[int, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """The GPTQ pass over w's columns in their current order (w is updated in place): each column is
    rounded with `params(column, block weights, index in block)` and its error spread over the columns
    after it (lazy block updates). Returns the int8 values (out, in)."""
    out, cols = w.shape
    q = torch.zeros(out, cols, dtype=torch.int8)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s, z = params(i1 + i, w1, i)
            qc = (torch.round(w1[:, i] / s) + z).clamp(scheme.qmin, scheme.qmax)
            q[:, i1 + i] = qc.to(torch.int8)
            e = (w1[:, i] - (qc - z) * s) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q


def _gptq_act_order(
    w: torch.Tensor, h: torch.Tensor, scheme: Scheme, gs: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ over columns in decreasing diag(H) order with static (pre-computed, contiguous) groups."""
    scales, zps = qparams(w, Scheme(scheme.bits, scheme.group_size and gs, scheme.symmetric))
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h[perm][:, perm])), upper=True)
    col_scale = scales[:, perm // gs]  # (out, cols): each permuted column's own group parameters
    col_zero = zps[:, perm // gs].float()
    q = _compensate(
        w[:, perm], hinv, scheme, block, lambda col, _w1, _i: (col_scale[:, col], col_zero[:, col])
    )
    q_original_order = torch.empty_like(q)
    q_original_order[:, perm] = q
    return q_original_order, scales, zps
