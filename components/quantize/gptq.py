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
    act_order: bool = False,
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

    q = torch.zeros(out, cols, dtype=torch.int8)
    groups = cols // gs
    scales = torch.zeros(out, groups)
    zps = torch.zeros(out, groups, dtype=torch.int8)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                g = col // gs
                scale, zp = qparams(w1[:, i : i + gs], Scheme(scheme.bits, None, scheme.symmetric))
                scales[:, g], zps[:, g] = scale[:, 0], zp[:, 0]
            g = col // gs
            s, z = scales[:, g], zps[:, g].float()
            qc = (torch.round(w1[:, i] / s) + z).clamp(scheme.qmin, scheme.qmax)
            q[:, col] = qc.to(torch.int8)
            e = (w1[:, i] - (qc - z) * s) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q, scales, zps


def _gptq_act_order(
    w: torch.Tensor, h: torch.Tensor, scheme: Scheme, gs: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ over columns in decreasing diag(H) order with static (pre-computed, contiguous) groups."""
    out, cols = w.shape
    scales, zps = qparams(w, Scheme(scheme.bits, scheme.group_size and gs, scheme.symmetric))
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    col_scale = scales[:, perm // gs]  # (out, cols): each permuted column's own group parameters
    col_zero = zps[:, perm // gs].float()
    q = torch.zeros(out, cols, dtype=torch.int8)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s, z = col_scale[:, i1 + i], col_zero[:, i1 + i]
            qc = (torch.round(w1[:, i] / s) + z).clamp(scheme.qmin, scheme.qmax)
            q[:, i1 + i] = qc.to(torch.int8)
            e = (w1[:, i] - (qc - z) * s) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q_original_order = torch.empty_like(q)
    q_original_order[:, perm] = q
    return q_original_order, scales, zps
