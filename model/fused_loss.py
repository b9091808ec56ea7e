"""Output projection + next-token cross-entropy as one operation ("fused linear cross-entropy").

Why: in a small or mid-sized language model the vocabulary projection and its loss are the single
biggest piece of a training step (for the `small` preset, a 16k-wide head is a third of all FLOPs),
and the textbook way of computing them is wasteful:

* it materialises the full (tokens, vocab) logits, then a log-softmax copy of them, then a gradient
  of the same size: three fresh buffers of tokens x vocab x 4 bytes (64 MB each for 1,024 tokens
  and a 16k vocabulary), which the CPU allocator maps and page-faults afresh on every step;
* it computes `hidden @ weight.T` with the vocabulary as the GEMM's inner output dimension, a shape
  MKL runs at ~75 GFLOP/s on an AVX2 core pair, against ~120 for the transposed product
  `weight @ hidden.T` (measured in benchmarks/RESULTS.md).

Here the logits are computed transposed, (vocab, chunk), into one reused workspace, a chunk of tokens
at a time; the softmax, the loss and the gradient of the logits are formed in place in that buffer,
and both input gradients (hidden and weight) are produced in the forward pass, while the buffer is
hot. The backward only scales them by the incoming gradient (the loss is linear in it). Peak memory
falls from ~3 x tokens x vocab to the workspace (bounded by `workspace_bytes`) plus one weight-sized
gradient. The result equals `F.cross_entropy(F.linear(h, w), targets)` to float rounding (tested).

Scope: used by `Transformer.forward(..., targets=...)`, the training path of every stage. The
workspace is cached per (device, dtype) and reused across calls, so this is not safe to call
concurrently from several threads of one process (training never does; inference uses logits).
"""

from __future__ import annotations

from typing import Any

import torch

# Default cap on the fp32 (vocab, chunk) logits workspace. CPU: 64 MiB holds 1,024 tokens of a 16k
# vocabulary (the `small` preset's whole micro-batch) and stays cache- and allocator-friendly.
# Accelerators: 512 MiB, so a GPU micro-batch of the seed-1.3b model (8,192 tokens, 50k vocabulary)
# takes 4 chunks of large GEMMs instead of 25 small ones, still far below the ~4 GB that logits,
# their fp32 copy and log-softmax take on the textbook path.
CPU_WORKSPACE_BYTES = 64 * 1024 * 1024
ACCELERATOR_WORKSPACE_BYTES = 512 * 1024 * 1024
_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _workspace(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A reused flat buffer of at least `numel` elements (grown, never shrunk)."""
    key = (device, dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, device=device, dtype=dtype)
        _workspaces[key] = buf
    return buf[:numel]


def release_workspaces() -> None:
    """Free the cached logits workspaces (e.g. after training, before serving in the same process)."""
    _workspaces.clear()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer would run in here: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,  # autograd's context object; the fields set on it below are this function's own
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        workspace_bytes: int,
        needs_grad: bool,
        needs_grad_weight: bool = True,
    ) -> torch.Tensor:
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        compute = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute)
            w = weight.to(compute)
            valid = targets != ignore_index
            n_valid = valid.sum()
            # mean over the scored tokens; 0 (not NaN) when every target is ignored
            scale = valid.to(torch.float32) / n_valid.clamp(min=1).to(torch.float32)  # (N,)
            safe_targets = torch.where(valid, targets, torch.zeros_like(targets))

            chunk = max(1, min(n_tokens, workspace_bytes // (vocab * 4)))
            buf = _workspace(vocab * chunk, hidden.device, torch.float32)
            low_precision = compute != torch.float32
            loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_h = torch.empty_like(h) if needs_grad else None
            # a frozen head (LoRA, QLoRA) gets no weight gradient: no weight-sized buffer, no (V, c) @ (c, C)
            grad_w = (
                torch.empty(weight.shape, device=weight.device, dtype=torch.float32)
                if needs_grad and needs_grad_weight
                else None
            )
            for start in range(0, n_tokens, chunk):
                end = min(start + chunk, n_tokens)
                cols = end - start
                h_c = h[start:end]
                logits_t = buf[: vocab * cols].view(vocab, cols)  # (V, c): token c's logits in column c
                if low_precision:
                    logits_t.copy_(w @ h_c.t())
                else:
                    torch.mm(w, h_c.t(), out=logits_t)
                col = torch.arange(cols, device=hidden.device)
                tgt = safe_targets[start:end]
                picked = logits_t[tgt, col]  # logit of the target token, read before the buffer is reused
                peak = logits_t.amax(dim=0)
                logits_t.sub_(peak).exp_()
                denom = logits_t.sum(dim=0)
                lse = peak + denom.log()
                s = scale[start:end]
                loss += ((lse - picked) * s).sum()
                if not needs_grad:
                    continue
                assert grad_h is not None
                # d loss / d logits = (softmax - onehot(target)) * scale, formed in place
                logits_t.mul_(s / denom)
                logits_t.index_put_((tgt, col), -s, accumulate=True)
                g = logits_t.to(compute)  # the buffer itself in fp32
                torch.mm(g.t(), w, out=grad_h[start:end])
                if grad_w is None:
                    continue
                # the first chunk writes the fp32 weight gradient (no zero-fill pass), later ones add to it
                if low_precision:
                    grad_w.add_(g @ h_c) if start else grad_w.copy_(g @ h_c)
                else:
                    grad_w.addmm_(g, h_c) if start else torch.mm(g, h_c, out=grad_w)
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.dtypes = (hidden.dtype, weight.dtype)
            ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # The gradients were computed in forward for a loss gradient of 1; scale them in place (they are
        # this function's own buffers, so no weight-sized copy is made), which is why a second backward
        # through the same graph (retain_graph=True) is refused rather than silently scaled twice.
        if ctx.consumed:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward was already run on this graph "
                "(retain_graph is not supported)"
            )
        ctx.consumed = True
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_weight = None if grad_w is None else grad_w.mul_(grad_loss).to(w_dtype)
        return grad_h.mul_(grad_loss).to(h_dtype), grad_weight, None, None, None, None, None


@torch.compiler.disable  # eager by design: the point is the buffer reuse and GEMM layout, not kernel fusion
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    workspace_bytes: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, without materialising the logits.

    hidden: (..., C) final hidden states; weight: (V, C) output projection; targets: (...) token ids,
    `ignore_index` positions excluded from the mean. Returns a 0-dim fp32 tensor. Differentiable in
    `hidden` and `weight` (none is computed for a weight that does not require one, e.g. a frozen head).
    Under autocast the projections run in the autocast dtype, the softmax in fp32.
    `workspace_bytes` caps the logits workspace (None: 64 MiB on CPU, 512 MiB on an accelerator).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} "
            "disagree on the token dimensions"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not project hidden size {hidden.shape[-1]}")
    if workspace_bytes is None:
        workspace_bytes = CPU_WORKSPACE_BYTES if hidden.device.type == "cpu" else ACCELERATOR_WORKSPACE_BYTES
    # decided here: inside autograd.Function.forward grad mode is always off
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1),
        ignore_index,
        workspace_bytes,
        needs_grad,
        weight.requires_grad,
    )
