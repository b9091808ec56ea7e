"""The decoder as ONNX sees it: token ids and the previous keys/values in, logits and the new keys/values out.

    inputs   input_ids                    (B, T) int64
             past_key_values.{i}.key      (B, K, P, D) float, for each layer i (P = 0 for the prefill)
             past_key_values.{i}.value    (B, K, P, D)
    outputs  logits                       (B, T, V) float
             present.{i}.key / .value     (B, K, P + T, D): the past with this call's keys/values appended

One graph serves both phases: the prefill passes empty pasts (P = 0) and the whole prompt; a decode
step passes the presents of the previous call and one token. Positions are P .. P + T - 1, so rows of
a batch share one length (no padding; batch requests of equal length, or run them one by one).

The same math as `Transformer.forward` over the same parameters (this module only holds a reference to
the model): RMSNorm, RoPE from the model's own tables, grouped-query attention with the kv heads
repeated for their query groups (explicit, so every ONNX runtime can run it), SwiGLU, the output head.
The model's in-place KV cache (model/kv_cache.py) is a preallocated buffer written by index; ONNX
graphs instead pass the cache in and out, which is what onnxruntime-genai, Optimum and TensorRT-LLM's
ONNX importers expect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.transformer import Transformer, apply_rope


def input_names(n_layers: int) -> list[str]:
    names = ["input_ids"]
    for i in range(n_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(n_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


class OnnxDecoder(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        assert cfg.n_kv_heads is not None and cfg.head_dim is not None
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T = input_ids.shape
        P = past[0].shape[2]
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        positions = torch.arange(T, device=input_ids.device) + P  # (T,)
        rotary = self.model.rotary
        cos, sin = rotary.cos[positions], rotary.sin[positions]  # (T, D/2)
        keys = torch.arange(P + T, device=input_ids.device)
        mask = keys.unsqueeze(0) <= positions.unsqueeze(1)  # (T, P+T): causal over past and new tokens
        x = self.model.model.embed_tokens(input_ids)  # (B, T, C)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = attn.k_proj(h).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
            v = attn.v_proj(h).view(B, T, K, D).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)  # (B, K, P+T, D)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            if H != K:  # each kv head serves H/K consecutive query heads
                k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.model.lm_head(self.model.model.norm(x))  # (B, T, V)
        return (logits, *presents)

    def empty_past(self, batch_size: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        shape = (batch_size, self.n_kv_heads, 0, self.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(2 * self.model.config.n_layers)]
