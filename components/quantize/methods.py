"""Quantizing one weight matrix: the schemes, round-to-nearest, and fake quantization.

Schemes (what `lmforge quantize --method` names):
  int8       8-bit, per output channel, symmetric (scale only)
  int4       4-bit, groups of `group_size` input columns, asymmetric (scale + zero point)
  int4-awq   int4 after activation-aware scaling (awq.py), calibrated
  int4-gptq  int4 with GPTQ error compensation (gptq.py), calibrated
The scales and zero points come from compressed-tensors' `calculate_qparams`, so values follow
that library's convention: q = clamp(round(w / scale) + zero_point), w ~ (q - zero_point) * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams

from lmforge.components.quantize import METHODS
from lmforge.errors import ConfigError

__all__ = [
    "METHODS"
]  # re-exported: the one list lives in the package file (importable without the libraries)

CALIBRATED = ("int4-awq", "int4-gptq")


@dataclass(frozen=True)
class Scheme:
    bits: int
    group_size: int | None  # None = per output channel
    symmetric: bool

    @classmethod
    def for_method(cls, method: str, group_size: int) -> Scheme:
        if method not in METHODS:
            raise ConfigError(f"quantize.method={method!r} is unknown; choose one of {', '.join(METHODS)}")
        if method == "int8":
            return cls(8, None, True)
        if (
            not isinstance(group_size, int)
            or isinstance(group_size, bool)
            or group_size < 8
            or group_size % 8
        ):
            raise ConfigError(
                f"quantize.group_size must be a multiple of 8 (e.g. 32, 64, 128), got {group_size!r}"
            )
        return cls(4, group_size, False)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def args(self) -> QuantizationArgs:
        if self.group_size is None:
            return QuantizationArgs(
                num_bits=self.bits, type="int", symmetric=self.symmetric, strategy="channel"
            )
        return QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=self.symmetric,
            strategy="group",
            group_size=self.group_size,
        )

    def ct_scheme(self, targets: list[str]) -> QuantizationScheme:
        return QuantizationScheme(targets=targets, weights=self.args())


def _grouped(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """(out, in) -> (out, groups, columns per group)."""
    out, cols = w.shape
    size = cols if scheme.group_size is None else scheme.group_size
    if cols % size:
        raise ConfigError(f"quantize.group_size={size} does not divide the layer's input dimension {cols}")
    return w.reshape(out, cols // size, size)


def qparams(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of shape (out, groups), float32 / int8, from each group's min and max."""
    g = _grouped(w.float(), scheme)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), scheme.args())
    zp = torch.round(zp.float()).clamp(scheme.qmin, scheme.qmax).to(torch.int8)
    return scale.float(), zp


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """(out, in) int8 values for given scales/zero points (round to nearest, clamp to the range)."""
    g = _grouped(w.float(), scheme)
    q = torch.round(g / scale.unsqueeze(-1)) + zp.float().unsqueeze(-1)
    return q.clamp(scheme.qmin, scheme.qmax).to(torch.int8).reshape(w.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    g = _grouped(q.float(), scheme)
    return ((g - zp.float().unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape)


def rtn(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (q int8 (out, in), scale (out, groups), zero_point int8 (out, groups))."""
    scale, zp = qparams(w, scheme)
    return quantize_with(w, scale, zp, scheme), scale, zp


def fake_quantize(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Quantize and dequantize with round-to-nearest (float, same shape): what the model will see."""
    q, scale, zp = rtn(w, scheme)
    return dequantize(q, scale, zp, scheme).to(w.dtype)
