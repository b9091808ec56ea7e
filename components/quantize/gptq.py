"""GPTQ-style error compensation (Frantar et al., 2022) for one Linear layer.

Columns are quantized left to right; the rounding error of each column is spread over the columns
not yet quantized, weighted by the inverse of H = 2/N X^T X (the curvature of the layer's squared
output error over the calibration inputs X), so later columns absorb what earlier ones lost. Group
scales/zero points are taken from the (already compensated) weights when their group starts. Lazy
block updates as in the paper; the Cholesky factor of H^-1 gives the row updates.
"""

from __future__ import annotations

import torch

from lmforge.components.quantize.methods import Scheme, qparams


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor, h: torch.Tensor, scheme: Scheme, *, damp: float = 0.01, block: int = 128
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
