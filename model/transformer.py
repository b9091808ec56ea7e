"""The lmforge decoder-only transformer, written from scratch in PyTorch.

Architecture: token embedding -> N x [RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output projection (optionally tied to the embedding).

Module and parameter names deliberately equal Hugging Face `LlamaForCausalLM`'s
(`model.layers.0.self_attn.q_proj.weight`, ...), so `state_dict()` IS a Hugging Face checkpoint and
no key remapping exists anywhere. The numerics follow the same conventions (RMSNorm in fp32,
"rotate-half" RoPE layout) so logits agree with transformers to float rounding.

Shapes in comments: B batch, T new tokens, S cached key positions, H query heads, K kv heads,
D head dim, C d_model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol, Self

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.fused_loss import fused_linear_cross_entropy
from lmforge.model.kv_cache import KVCache
from lmforge.model.varlen import VarlenLayout


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the gain (as Llama does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables for every position up to max_seq_len (no parameters, not saved)."""

    cos: torch.Tensor  # buffers, registered in __init__
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables(None)
        self.register_buffer("cos", cos, persistent=False)  # (max_seq_len, D/2), fp32
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (
            self.theta
            ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.int64).float() / self.head_dim)
        )
        positions = torch.arange(self.max_seq_len, device=device, dtype=torch.int64).float()
        angles = torch.outer(positions, inv_freq)  # (max_seq_len, D/2)
        return angles.cos(), angles.sin()

    def reset_tables(self, device: torch.device | str | None = None) -> None:
        """Recompute the tables in fp32 (after a meta-device init or a low-precision cast)."""
        self.cos, self.sin = self._tables(torch.device(device) if device is not None else self.cos.device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        # model.to(bfloat16) would round the tables; keep them fp32 (they are cast per use in apply_rope).
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32 and self.cos.device.type != "meta":
            self.reset_tables()
        return self

    def forward(self, positions: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the given positions: (T, D/2) for shared positions, (B, 1, T, D/2) per row."""
        if positions is None:
            return self.cos[:seq_len], self.sin[:seq_len]
        if positions.dim() == 1:
            return self.cos[positions], self.sin[positions]
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, D) by the angles in cos/sin, in the half-split layout Llama uses."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor
) -> torch.Tensor:
    """Attention of one new query per row, (B, H, 1, D) over cached (B, K, S, D), as plain reductions.

    Same math as SDPA with a boolean mask. Used only when compiling a CPU decode step: there
    SDPA's flash kernel costs ~150 us per call for a single query, while inductor fuses these
    few reductions into two small loops (and reads each kv head once for its whole query group)."""
    B, H, _, D = q.shape
    K = k.shape[1]
    q = q.view(B, K, H // K, 1, D)  # query heads grouped under their kv head
    scores = (q * k.unsqueeze(2)).sum(-1) * D**-0.5  # (B, K, G, S)
    scores = scores.masked_fill(~attn_mask.view(attn_mask.shape[0], 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    y = (probs.unsqueeze(-1) * v.unsqueeze(2)).sum(-2)  # (B, K, G, D)
    return y.reshape(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        assert cfg.head_dim is not None and cfg.n_kv_heads is not None
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        positions: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        varlen: VarlenLayout | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            assert positions is not None
            k, v = kv_cache.update(self.layer_idx, positions, k, v)  # (B, K, S, D)
        # enable_gqa lets each group of query heads read its kv head in place (no repeat_interleave copy)
        gqa = self.n_kv_heads != self.n_heads
        if varlen is not None:  # (1, N) flattened examples: attention on each example's own row
            y = F.scaled_dot_product_attention(
                varlen.gather(q), varlen.gather(k), varlen.gather(v), is_causal=True, enable_gqa=gqa
            )
            return self.o_proj(varlen.scatter(y))
        if T == 1 and attn_mask is not None and x.device.type == "cpu" and torch.compiler.is_compiling():
            y = decode_attention(q, k, v, attn_mask)
        elif attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only `gate` and `up` for the backward pass.

    Autograd on the plain expression keeps three (tokens, d_ff) tensors per layer: gate (for silu's
    gradient), silu(gate) and up (for the product's). silu(gate) is cheap to recompute from gate, so
    this keeps two: a sixth of a block's saved activations on SwiGLU models, for every training
    method (measured in benchmarks/RESULTS.md, Fine-tuning). Same values and gradients (tested)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dtype = gate.dtype
        # in fp32 for half-precision inputs, as torch's own silu backward computes (one rounding at the end)
        g = gate.float() if dtype in (torch.bfloat16, torch.float16) else gate
        sig = torch.sigmoid(g)
        silu = g * sig
        # d silu / d gate = sig * (1 + gate * (1 - sig)) = sig + silu * (1 - sig)
        grad_gate = grad * up * (sig + silu * (1 - sig))
        return grad_gate.to(dtype), (grad * silu).to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; while training, through `_SwiGLU` (one saved tensor fewer)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.d_ff is not None
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    _lmforge_checkpointed = False  # set by apply_activation_checkpointing

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        varlen: VarlenLayout | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, positions, attn_mask, varlen)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The body (named `model` inside Transformer, as in LlamaForCausalLM)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class LMHead(nn.Linear):
    """The output projection. Called with `targets`, it returns the mean next-token loss through the
    fused projection + cross-entropy (model/fused_loss.py) instead of logits: the training path.

    The loss goes through the module call (not a bare use of `weight`) so that wrappers which gather
    a module's parameters around its forward (DeepSpeed ZeRO-3, FSDP) see the head being used."""

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100
    ) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return fused_linear_cross_entropy(x, self.weight, targets, ignore_index=ignore_index)


class Transformer(nn.Module):
    """Causal language model; `forward` maps token ids (B, T) to next-token logits (B, T, vocab),
    or, given `targets`, to the mean next-token loss without materialising the logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.head_dim is not None
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices; residual output projections scaled by 1/sqrt(2L)
        so the residual stream's variance does not grow with depth (GPT-2 / Llama practice)."""
        cfg = self.config
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        positions: torch.Tensor | None = None,  # (T,) or (B, T) absolute positions; None = 0..T-1
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,  # bool (B or 1, 1, T, S), True = may attend
        last_only: bool = False,  # logits for the last position only (prefill: skips T-1 vocab projections)
        targets: torch.Tensor
        | None = None,  # (B, T) next-token ids (-100 = not scored): return the mean loss
        varlen: VarlenLayout | None = None,  # input_ids (1, N): several examples flattened (model/varlen.py)
    ) -> torch.Tensor:
        B, T = input_ids.shape
        flat_row = B == 1 and positions is not None and kv_cache is None and attn_mask is None
        if varlen is not None and not flat_row:
            raise ValueError("a varlen batch is one flattened row (1, N) with positions, no KV cache or mask")
        if targets is not None and (last_only or kv_cache is not None):
            raise ValueError("targets (training loss) cannot be combined with last_only or a KV cache")
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(
                f"targets {tuple(targets.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
            )
        if positions is None and kv_cache is not None:
            raise ValueError("decoding with a KV cache needs explicit token positions")
        if positions is None and T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {T} tokens exceeds the model's context of {self.config.max_seq_len}"
            )
        cos, sin = self.rotary(positions, T)
        if kv_cache is not None and attn_mask is None:
            assert positions is not None  # (rejected above)
            attn_mask = kv_cache.causal_mask(positions)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv_cache, positions, attn_mask, varlen)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if targets is not None:
            return self.lm_head(x, targets=targets)  # 0-dim fp32 loss
        return self.lm_head(x)  # (B, T or 1, vocab)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class CausalLM(Protocol):
    """What decoding (generation, the engine, beam search, speculative decoding, scoring) uses of a
    model: its config, its parameters (for device and dtype) and Transformer's call signature.

    A protocol rather than Transformer itself, so tests can decode with small fake modules whose
    next-token distribution they know exactly."""

    config: ModelConfig

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor: ...


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss; `targets` are already shifted (targets[t] = input[t+1]). Computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1), ignore_index=ignore_index)


def apply_activation_checkpointing(model: Transformer) -> Transformer:
    """Recompute each block's activations in the backward pass instead of storing them.

    Trades ~1/3 more compute for activation memory that no longer grows with depth. Applied as a
    transform (the block's forward is wrapped), so parameter names and `forward` stay unchanged
    and it composes with torch.compile (non-reentrant checkpointing)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.model.layers:
        assert isinstance(block, Block)
        if block._lmforge_checkpointed:
            continue
        inner = block.forward

        def checkpointed(
            *args: Any, _inner: Callable[..., torch.Tensor] = inner, **kwargs: Any
        ) -> torch.Tensor:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed  # type: ignore[method-assign]  # this block's forward, wrapped in place
        block._lmforge_checkpointed = True
    return model
