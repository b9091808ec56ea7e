"""Preallocated key/value cache for incremental decoding.

The cache is allocated once for (layers, batch, kv_heads, max_len, head_dim) and written in place at
the positions of each new token, so decoding never reallocates or concatenates. Positions may be
shared by the whole batch, shape (T,), or given per row, shape (B, T): the latter lets rows of a
batch sit at different lengths (continuous batching, prompts of different lengths).

`active_len` bounds how many key positions attention reads: a caller that knows the furthest
position in use (the generation loop does) sets it, so a short sequence does not pay for attention
over the whole preallocated context. Left at max_len, every step has the same shapes (what CUDA
graphs and torch.compile want).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lmforge.model.transformer import CausalLM


class KVCache(nn.Module):
    k: torch.Tensor  # buffers, registered in __init__ (or in rows(), as views of another cache's)
    v: torch.Tensor

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len
        self.batch_size = batch_size
        self.active_len = max_len

    @classmethod
    def for_model(
        cls, model: CausalLM, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        cfg = model.config
        assert cfg.n_kv_heads is not None and cfg.head_dim is not None  # (filled in by __post_init__)
        param = next(model.parameters())
        max_len = max_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds the model's context of {cfg.max_seq_len}")
        return cls(
            cfg.n_layers,
            batch_size,
            cfg.n_kv_heads,
            max_len,
            cfg.head_dim,
            dtype or param.dtype,
            param.device,
        )

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at `positions`; return this layer's keys/values (B, K, active_len, D)."""
        if positions.dim() == 1:
            self.k[layer].index_copy_(2, positions, k)
            self.v[layer].index_copy_(2, positions, v)
        else:
            # One index_put_ on the whole buffer (the layer as a tensor index too, not a view first):
            # under torch.compile a write into a view of the cache is functionalised into a copy of
            # the layer's entire cache every step; a write into the buffer itself stays in place.
            rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # (B, 1) broadcasts with (B, T)
            layers = torch.full_like(rows, layer)
            self.k[layers, rows, :, positions] = k.transpose(1, 2)  # indexed view is (B, T, K, D)
            self.v[layers, rows, :, positions] = v.transpose(1, 2)
        return self.k[layer, :, :, : self.active_len], self.v[layer, :, :, : self.active_len]

    def causal_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Boolean mask (B or 1, 1, T, active_len): a token sees every cached key at or before it."""
        keys = torch.arange(self.active_len, device=positions.device)
        mask = keys <= positions.unsqueeze(-1)  # (T, S) or (B, T, S)
        return mask.unsqueeze(0).unsqueeze(0) if positions.dim() == 1 else mask.unsqueeze(1)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.active_len = self.max_len

    # ---- row management (continuous batching, n samples per prompt, beam search) ---------------
    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over batch rows [start, stop) sharing this cache's storage.

        Writes through the view land in this cache, so an engine can prefill one slot with a
        batch of 1, or decode only the low rows in use, without copying anything."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows [{start}, {stop}) are outside the cache's {self.batch_size} rows")
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[:, start:stop], persistent=False)
        view.register_buffer("v", self.v[:, start:stop], persistent=False)
        view.max_len, view.batch_size, view.active_len = self.max_len, stop - start, self.active_len
        return view

    def copy_row(self, src: int, dst: list[int], length: int) -> None:
        """Copy positions [0, length) of row `src` into each row of `dst` (samples sharing a prefill)."""
        if dst:
            index = torch.tensor(dst, device=self.k.device)
            self.k[:, index, :, :length] = self.k[:, src : src + 1, :, :length]
            self.v[:, index, :, :length] = self.v[:, src : src + 1, :, :length]

    def select_rows(self, index: torch.Tensor, length: int) -> None:
        """Row i takes positions [0, length) of row index[i] (beam search reordering its beams)."""
        self.k[:, :, :, :length] = self.k[:, index, :, :length]
        self.v[:, :, :, :length] = self.v[:, index, :, :length]
