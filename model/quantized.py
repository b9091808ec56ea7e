"""Weight-only quantized linear layers, stored in the compressed-tensors "pack-quantized" layout.

A quantized model directory is an ordinary model directory whose `config.json` carries a
`quantization_config` (quant_method "compressed-tensors", format "pack-quantized") and whose
quantized Linear layers are stored, instead of `weight`, as

    weight_packed      int32 (out, ceil(in * bits / 32))   values + 2**(bits-1), packed densely,
                                                             element i at bits [i*bits, (i+1)*bits)
    weight_scale       float (out, groups)                  groups = 1 (per channel) or in / group_size
    weight_zero_point  int32 (ceil(out * bits / 32), groups) asymmetric schemes only, packed along dim 0
    weight_shape       int64 (2,)                            (out, in)

and dequantize as w = (q - zero_point) * scale, q and zero_point signed in [-2**(bits-1), 2**(bits-1)).
That is the layout transformers (with compressed-tensors) and vLLM read. `QuantizedLinear` keeps
exactly those tensors as its buffers, so its `state_dict()` is the on-disk form: memory is what the
file holds (int8: 1 byte per weight, int4: half a byte, plus scales).

For bits in {4, 8} dense packing puts whole values in bytes (little-endian words), so unpacking is a
byte view plus, for int4, two nibble masks.

QLoRA: `lmforge.model.quantized.QuantizedLinear` has `in_features`/`out_features`, no trainable
parameters, and its forward (dequantize, then matmul) is differentiable with respect to its input,
so adapters can sit on top of it (peft: register a custom module mapping for this class).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import int8_gemv
from lmforge.model.config import ConfigError, ModelConfig
from lmforge.model.fused_loss import fused_linear_cross_entropy
from lmforge.model.transformer import Transformer

QUANT_METHOD = "compressed-tensors"
PACKED_FORMAT = "pack-quantized"
SUPPORTED_BITS = (4, 8)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class QuantizedDirError(ConfigError):
    """A quantized model directory declares a scheme lmforge cannot load (the field is named)."""


def quantization_scheme(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The `quantization_config` of a model directory's config.json, or None if it is not quantized."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return qc if isinstance(qc, dict) and qc else None


# ---- packing --------------------------------------------------------------------------------
def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizedDirError(
            f"quantization num_bits={bits} is not supported; lmforge loads {SUPPORTED_BITS}"
        )
    if sys.byteorder != "little":  # the byte views below assume little-endian int32 words
        raise QuantizedDirError("quantized models load on little-endian machines only")


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed `bits`-bit values (int8 tensor, 2-D) into int32 words along `dim` (0 or 1), the
    compressed-tensors dense layout: value + 2**(bits-1), element i at bit offset i * bits."""
    _check_bits(bits)
    if dim == 0:
        return pack_int32(q.t(), bits, 1).t().contiguous()
    rows, cols = q.shape
    per_word = 32 // bits
    padded = math.ceil(cols / per_word) * per_word
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    u = F.pad(u, (0, padded - cols))
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)  # low nibble = even element
    return u.contiguous().view(torch.int32).reshape(rows, padded * bits // 32)


def unpack_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of `pack_int32`: the signed values as an int8 tensor of `shape`."""
    _check_bits(bits)
    if dim == 0:
        return unpack_int32(packed.t().contiguous(), bits, (shape[1], shape[0]), 1).t()
    rows, cols = shape
    u = packed.contiguous().view(torch.uint8).reshape(rows, -1)
    if bits == 4:
        u = torch.stack((u & 0xF, u >> 4), dim=-1).reshape(rows, -1)
    return (u[:, :cols].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


# ---- the module -----------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """`lmforge.model.quantized.QuantizedLinear`: a frozen weight-only int8/int4 Linear (no bias).

    `group_size=None` quantizes per output channel; otherwise each row is split into groups of
    `group_size` input columns with their own scale (and zero point if `symmetric=False`).
    Called with `targets` (as the output head is in training), it returns the fused loss instead
    of logits, like `transformer.LMHead`."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_shape: torch.Tensor
    weight_zero_point: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        scale_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_bits(bits)
        if group_size is not None and in_features % group_size != 0:
            raise QuantizedDirError(
                f"group_size={group_size} does not divide the layer's input dimension {in_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = 1 if group_size is None else in_features // group_size
        words = math.ceil(in_features * bits / 32)
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, words, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, groups, dtype=scale_dtype, device=device)
        )
        self.register_buffer(
            "weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device)
        )
        if symmetric:
            self.weight_zero_point = None
        else:
            zp_rows = math.ceil(out_features * bits / 32)
            self.register_buffer(
                "weight_zero_point", torch.zeros(zp_rows, groups, dtype=torch.int32, device=device)
            )

    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,  # (out, in) int8, signed values
        scale: torch.Tensor,  # (out, groups)
        zero_point: torch.Tensor | None,  # (out, groups) int8, or None (symmetric)
        bits: int,
        group_size: int | None,
    ) -> QuantizedLinear:
        out_features, in_features = q.shape
        module = cls(in_features, out_features, bits, group_size, zero_point is None, scale.dtype, q.device)
        module.weight_packed = pack_int32(q, bits)
        module.weight_scale = scale.contiguous()
        if zero_point is not None:
            module.weight_zero_point = pack_int32(zero_point.to(torch.int8), bits, dim=0)
        return module

    def int_weight(self) -> torch.Tensor:
        """(out, in) int8: the stored integer values."""
        return unpack_int32(self.weight_packed, self.bits, (self.out_features, self.in_features))

    def zero_point(self) -> torch.Tensor | None:
        """(out, groups) int8, or None for a symmetric scheme."""
        if self.weight_zero_point is None:
            return None
        groups = self.weight_scale.shape[1]
        return unpack_int32(self.weight_zero_point, self.bits, (self.out_features, groups), dim=0)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) weight in `dtype` (default: the scale's): (q - zero_point) * scale."""
        dtype = dtype or self.weight_scale.dtype
        groups = self.weight_scale.shape[1]
        q = self.int_weight().to(dtype).view(self.out_features, groups, -1)  # (out, G, in/G)
        zp = self.zero_point()
        if zp is not None:
            q = q - zp.to(dtype).unsqueeze(-1)
        return (q * self.weight_scale.to(dtype).unsqueeze(-1)).view(self.out_features, self.in_features)

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100
    ) -> torch.Tensor:
        if targets is None and self._use_int8_kernel(x):
            # decode-sized input, int8 per channel: the AVX2 GEMV reads the stored bytes directly
            rows = x.numel() // self.in_features
            y = int8_gemv.int8_gemv(
                x.reshape(rows, self.in_features).float(),
                self.weight_packed.view(torch.uint8),
                self.weight_scale.view(-1).float(),
            )
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if targets is None and self.group_size is None and self.symmetric:
            # per-channel symmetric: the scale factors out of the dot products, y = (x q^T) * scale,
            # so only an int8 -> float conversion precedes the matmul (about 4x cheaper on CPU than
            # materialising the scaled weight)
            return F.linear(x, self.int_weight().to(x.dtype)) * self.weight_scale[:, 0].to(x.dtype)
        weight = self.dequantize(x.dtype)
        if targets is not None:
            return fused_linear_cross_entropy(x, weight, targets, ignore_index=ignore_index)
        return F.linear(x, weight)

    def _use_int8_kernel(self, x: torch.Tensor) -> bool:
        """int8 per-channel, CPU, at most int8_gemv.MAX_ROWS rows, no gradient needed, and the kernel
        built here (decided once per process; under torch.compile only if decided beforehand, e.g.
        by `apply_decode_layout`, so tracing never builds or warns)."""
        if not (
            self.bits == 8
            and self.group_size is None
            and self.symmetric
            and x.device.type == "cpu"
            and x.numel() <= int8_gemv.MAX_ROWS * self.in_features
            and not (x.requires_grad and torch.is_grad_enabled())
        ):
            return False
        if torch.compiler.is_compiling():
            return int8_gemv.decided_available()
        return int8_gemv.available()

    def extra_repr(self) -> str:
        scheme = "per-channel" if self.group_size is None else f"group {self.group_size}"
        kind = "symmetric" if self.symmetric else "asymmetric"
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, int{self.bits} {scheme} {kind}"


# ---- the input embedding, looked up in a quantized output head ----------------------------------
class QuantizedEmbedding(nn.Module):
    """Input embedding rows read from the quantized output head they were tied to (dequantized as
    looked up), so the engine holds one int8/int4 copy of the vocabulary matrix instead of that copy
    plus the fp32 embedding. The head is referenced, not registered: it is stored (and counted) once,
    under `lm_head`, and this module has no tensors of its own (its model's state dict then lacks
    `model.embed_tokens.weight`, so a model transformed this way is for inference, not for saving)."""

    def __init__(self, head: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self._head = (head,)  # a tuple: not a submodule
        self.num_embeddings, self.embedding_dim, self.dtype = head.out_features, head.in_features, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self._head[0]
        flat = ids.reshape(-1)
        n, cols = flat.numel(), head.in_features
        q = unpack_int32(head.weight_packed[flat], head.bits, (n, cols)).to(torch.float32)  # (n, C)
        scale = head.weight_scale[flat].to(torch.float32)  # (n, groups)
        groups = scale.shape[1]
        q = q.view(n, groups, cols // groups)
        if head.weight_zero_point is not None:  # packed along the vocabulary: row r in word r // per_word
            per_word = 32 // head.bits
            words = head.weight_zero_point[flat // per_word]  # (n, groups) int32
            shift = ((flat % per_word) * head.bits).unsqueeze(-1)
            zp = ((words >> shift) & ((1 << head.bits) - 1)) - (1 << (head.bits - 1))
            q = q - zp.to(torch.float32).unsqueeze(-1)
        rows = (q * scale.unsqueeze(-1)).view(n, cols)
        return rows.to(self.dtype).view(*ids.shape, cols)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, from the int{self._head[0].bits} lm_head"


def share_tied_embedding(model: nn.Module) -> nn.Module:
    """`share_tied_embedding(model) -> model`: if `model` was loaded from a quantized directory whose
    output head was quantized from the matrix its input embedding is tied to (`lmforge quantize`
    records it), look embedding rows up in the quantized head and drop the full-precision embedding
    from memory. Any other model is returned unchanged. In place; for inference (see
    QuantizedEmbedding). Costs the head's quantization error on the embedding rows too (measured in
    benchmarks/RESULTS.md, Quantization)."""
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    embed = getattr(inner, "embed_tokens", None)
    if (
        not getattr(model, "head_tied_to_embedding", False)
        or not isinstance(head, QuantizedLinear)
        or not isinstance(embed, nn.Embedding)
        or tuple(embed.weight.shape) != (head.out_features, head.in_features)
    ):
        return model
    inner.embed_tokens = QuantizedEmbedding(head, embed.weight.dtype)  # type: ignore[union-attr]
    return model


# ---- building a model from a quantized directory ----------------------------------------------
def _weights_args(group: dict[str, Any], name: str) -> tuple[int, int | None, bool]:
    """(bits, group_size, symmetric) of one config group, checked."""
    w = group.get("weights")
    if not isinstance(w, dict):
        raise QuantizedDirError(f"quantization_config.config_groups.{name}.weights is missing")
    if group.get("input_activations") or group.get("output_activations"):
        raise QuantizedDirError(
            f"quantization_config.config_groups.{name}: activation quantization is not supported "
            "(lmforge loads weight-only schemes)"
        )
    if w.get("type", "int") != "int":
        raise QuantizedDirError(
            f"quantization_config.config_groups.{name}.weights.type={w.get('type')!r}: only 'int'"
        )
    bits = int(w.get("num_bits", 8))
    _check_bits(bits)
    strategy = w.get("strategy")
    if strategy == "channel":
        group_size = None
    elif strategy == "group":
        group_size = int(w["group_size"])
    else:
        raise QuantizedDirError(
            f"quantization_config.config_groups.{name}.weights.strategy={strategy!r}: "
            "lmforge loads 'channel' and 'group'"
        )
    return bits, group_size, bool(w.get("symmetric", True))


def _matches(target: str, module_name: str, module_type: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module_name) is not None
    return target in (module_type, module_name)


def check_scheme(qc: dict[str, Any]) -> dict[str, tuple[int, int | None, bool]]:
    """Validate a quantization_config; {group name: (bits, group_size, symmetric)}."""
    if qc.get("quant_method") != QUANT_METHOD:
        raise QuantizedDirError(
            f"quantization_config.quant_method={qc.get('quant_method')!r}: lmforge loads {QUANT_METHOD!r}"
        )
    if qc.get("format") != PACKED_FORMAT:
        raise QuantizedDirError(
            f"quantization_config.format={qc.get('format')!r}: lmforge loads {PACKED_FORMAT!r}"
        )
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantizedDirError("quantization_config.config_groups is missing or empty")
    return {name: _weights_args(group, name) for name, group in groups.items()}


def build_quantized_model(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    qc: dict[str, Any],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """A Transformer whose quantized Linear layers (those with `<name>.weight_packed` in `state`) are
    `QuantizedLinear`s holding the stored tensors; other tensors are assigned as usual (cast to
    `dtype` if given). The scheme dict is kept as `model.quantization_config` (saving writes it back)."""
    args = check_scheme(qc)
    ignore = set(qc.get("ignore") or [])
    with torch.device("meta"):
        model = Transformer(cfg)
    quantized = sorted(k.removesuffix(".weight_packed") for k in state if k.endswith(".weight_packed"))
    for name in quantized:
        module_type = "Linear"
        group = next(
            (
                g
                for g, spec in qc["config_groups"].items()
                if any(_matches(t, name, module_type) for t in spec.get("targets", []))
            ),
            None,
        )
        if group is None or name in ignore:
            raise QuantizedDirError(f"{name} is stored quantized but no quantization_config group targets it")
        bits, group_size, symmetric = args[group]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear):
            raise QuantizedDirError(f"{name} is stored quantized but is not a Linear layer of this model")
        with torch.device("meta"):
            new = QuantizedLinear(
                old.in_features,
                old.out_features,
                bits,
                group_size,
                symmetric,
                state[f"{name}.weight_scale"].dtype,
            )
        setattr(parent, child, new)
    if cfg.tie_embeddings and "lm_head" in quantized:
        raise QuantizedDirError("tie_word_embeddings is true but lm_head is stored quantized")
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise QuantizedDirError(
            f"quantized weights do not match config.json (missing: {missing[:5] or 'none'}; "
            f"unexpected: {unexpected[:5] or 'none'})"
        )
    if dtype is not None:
        state = {
            k: v.to(dtype) if v.is_floating_point() and not k.endswith("weight_scale") else v
            for k, v in state.items()
        }
    for name, tensor in state.items():
        if name in ("lm_head.weight",) and cfg.tie_embeddings:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(owner, QuantizedLinear):
            stored = getattr(owner, attr)
            if stored is None or tuple(stored.shape) != tuple(tensor.shape):
                raise QuantizedDirError(
                    f"{name} has shape {tuple(tensor.shape)}, expected "
                    f"{None if stored is None else tuple(stored.shape)} for the declared scheme"
                )
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.reset_tables(device)
    model.quantization_config = qc  # type: ignore[assignment]  # (read back by save_model_dir)
    return model.eval()


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the tensors the model stores (its state dict: parameters and persistent buffers,
    shared ones counted once), measured from the tensors themselves (numel * element size)."""
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
