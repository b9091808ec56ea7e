"""The on-disk layout of a quantized model: compressed-tensors' "pack-quantized" format.

compressed-tensors writes it: its `PackedQuantizationCompressor` packs each layer's values, scales
and zero points, and its `ModelCompressor.update_config` serializes the `quantization_config` block
of config.json. The packed tensors are then held by lmforge's `QuantizedLinear` (model/quantized.py),
whose state dict is that layout, and the directory is written by the ordinary `save_model_dir`. So
the same directory loads in lmforge, in transformers (with compressed-tensors) and in vLLM.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from torch import nn

from lmforge.components.quantize.methods import Scheme, dequantize
from lmforge.model.quantized import QuantizedLinear


def quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config`, serialized by compressed-tensors itself."""
    qc = QuantizationConfig(
        config_groups={"group_0": scheme.ct_scheme(["Linear"])},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=ignore,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text("{}")
        ModelCompressor(quantization_config=qc).update_config(tmp)
        return json.loads((Path(tmp) / "config.json").read_text())["quantization_config"]


def compressed_linear(
    q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, scheme: Scheme
) -> QuantizedLinear:
    """A QuantizedLinear holding what compressed-tensors' packer writes for these values."""
    ct_scheme = scheme.ct_scheme(["Linear"])
    state = {"weight": dequantize(q, scale, zp, scheme), "weight_scale": scale.float()}
    if not scheme.symmetric:
        state["weight_zero_point"] = zp
    packed = PackedQuantizationCompressor.compress(state, ct_scheme)
    out_features, in_features = q.shape
    module = QuantizedLinear(in_features, out_features, scheme.bits, scheme.group_size, scheme.symmetric)
    module.weight_packed = packed["weight_packed"]
    module.weight_scale = packed["weight_scale"].contiguous()
    if not scheme.symmetric:
        module.weight_zero_point = packed["weight_zero_point"]
    return module


@torch.no_grad()
def to_quantized_model(
    model: nn.Module,
    params: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    scheme: Scheme,
    ignore: list[str],
) -> nn.Module:
    """Replace the named Linear layers of `model` (in place) by QuantizedLinear; sets
    `model.quantization_config`, which `save_model_dir` writes into config.json."""
    for name, (q, scale, zp) in params.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, compressed_linear(q, scale, zp, scheme))
    model.quantization_config = quantization_config(scheme, ignore)
    return model


def patch_transformers_loading() -> None:
    """Let transformers load asymmetric pack-quantized checkpoints (compressed-tensors 0.20).

    When transformers builds the empty model it compresses it on the meta device, where
    compressed-tensors 0.20's `PackedQuantizationCompressor.compress` leaves `weight_zero_point`
    unpacked, (out, groups), while the checkpoint (written by the same library) holds it packed,
    (out * bits / 32, groups); transformers then refuses the size mismatch. This gives the meta
    tensor the packed shape. Symmetric schemes (lmforge's int8) need no patch. Idempotent."""
    if getattr(PackedQuantizationCompressor, "_lmforge_patched", False):
        return
    original = PackedQuantizationCompressor.compress.__func__  # type: ignore[attr-defined]

    def compress(cls, state_dict, scheme):
        out = original(cls, state_dict, scheme)
        zp, w = state_dict.get("weight_zero_point"), scheme.weights
        if (
            zp is not None
            and zp.device.type == "meta"
            and not w.symmetric
            and w.strategy in ("group", "channel")
            and "weight_zero_point" in out
        ):
            rows = math.ceil(zp.shape[0] * w.num_bits / 32)
            out["weight_zero_point"] = torch.empty((rows, *zp.shape[1:]), dtype=torch.int32, device="meta")
        return out

    PackedQuantizationCompressor.compress = classmethod(compress)  # type: ignore[method-assign,assignment]
    PackedQuantizationCompressor._lmforge_patched = True  # type: ignore[attr-defined]
