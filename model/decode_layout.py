"""CPU weight layouts for fast decoding: `apply_decode_layout(model, for_compile=False) -> model`.

Decoding multiplies a few rows (one per running sequence) by every weight matrix, once per token.
With one row the cost is streaming the weights from memory; with a batch of rows it is the matrix
multiply itself. Measured on a 2-core AMD EPYC with PyTorch's MKL/oneDNN (fp32, `small` preset):
- one row, wide matrix (out > in: the MLP's gate/up projections, the output head): MKL reads a
  row-major W at about half the memory bandwidth of a column-major one (output head 4.5 -> 1.9 ms);
  narrow matrices (the down projection) prefer row-major. So wide matrices are stored column-major.
- several rows, the 16k x 512 output head: MKL's small-batch GEMM reaches ~16 GFLOP/s, oneDNN with
  pre-packed weights ~36 (16 rows: 17 -> 7.5 ms). So the output head keeps a pre-packed copy for
  multi-row inputs (it is the one matrix large enough for this to matter; the copy costs its size
  in memory).

- one row through `torch.compile` (the engine's static-shape decode step): inductor fuses
  `(weight * x).sum(-1)` into one vectorised, multi-threaded reduction that streams a row-major
  weight at ~15 GB/s on 2 cores, against ~7-11 GB/s for MKL's GEMV in either layout (40 MLP-sized
  matrices: 16.8 ms -> 6.5 ms). `MatvecLinear` does this rewrite only while compiling, only for a
  single row and only for row-major weights; `for_compile=True` keeps every weight row-major for it.

- int8 weight-only layers (`QuantizedLinear`, per channel) decode through the AVX2 int8 GEMV of
  int8_gemv.py for inputs of up to a few rows; this transform builds it (once, cached) or warns why
  not, before any torch.compile traces the model.

Values, parameter names, tied weights and the state dict are unchanged and results agree to float
rounding. Meant for models used for inference: some training code expects contiguous parameters,
so callers apply it explicitly (`lmforge generate`, the benchmark, the server), like any other
model transform. If the weights change afterwards the packed copy is rebuilt on next use.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import int8_gemv
from lmforge.model.quantized import QuantizedLinear
from lmforge.model.transformer import LMHead

PACK_MIN_OUT_FEATURES = 8192  # only an output-head-sized matrix gains from a packed copy


def _compiled_single_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.numel() == x.shape[-1]
        and weight.is_contiguous()
    )


class MatvecLinear(nn.Linear):
    """nn.Linear whose single-row input, when compiled for CPU, is a reduction inductor can fuse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _compiled_single_row(x, self.weight):
            y = (self.weight * x.reshape(1, -1)).sum(-1)  # (out,): never materialised once fused
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


class PackedHeadLinear(MatvecLinear):
    """MatvecLinear whose multi-row inputs use a oneDNN pre-packed copy of the weight."""

    packed_rows = 16  # the batch size the packing is tuned for (any batch size is correct)
    packed: torch.Tensor  # set by _pack(), with the weight version it was packed from
    _packed_key: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= 1 or x.dtype != torch.float32 or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(x)  # (under torch.compile, inductor picks the GEMM or the reduction)
        key = (self.weight.data_ptr(), self.weight._version)
        if key != self._packed_key:  # the weights changed since packing: pack again
            self._pack()
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(rows, x.shape[-1]), self.packed, self.bias, "none", [None], ""
        )
        return y.view(*x.shape[:-1], self.out_features)

    def _pack(self) -> None:
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(
                self.weight.detach().contiguous(), self.packed_rows
            )
        self._packed_key = (self.weight.data_ptr(), self.weight._version)


def _packing_works() -> bool:
    """The oneDNN ops are private to PyTorch: use them only if present and numerically right."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.randn(64, 32), torch.randn(4, 32)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")
        return torch.allclose(y, F.linear(x, w), atol=1e-4)
    except (AttributeError, RuntimeError):
        return False


@torch.no_grad()
def apply_decode_layout(model: nn.Module, for_compile: bool = False) -> nn.Module:
    """Lay out the model's fp32 CPU linear weights for decoding (see the module docstring).

    `for_compile=False` (eager decoding): wide matrices column-major, for MKL's GEMV.
    `for_compile=True` (a compiled single-row decode step): every matrix row-major, for the fused
    reduction. Either call may follow the other; the last one decides."""
    pack = None
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module.bits == 8 and module.group_size is None:
            int8_gemv.available()  # int8 layers decode through the int8 GEMV: build it (or warn) now
        if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
            continue
        weight = module.weight
        if weight.dtype != torch.float32:
            continue
        if type(module) in (nn.Linear, LMHead):  # (LMHead's fused-loss call is for training only)
            module.__class__ = MatvecLinear  # same module, parameters and hooks; new forward
        if for_compile:
            if not weight.is_contiguous():
                weight.data = weight.data.contiguous()  # back to row-major: same values, same Parameter
        elif module.out_features > module.in_features and weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()  # column-major: same values, same Parameter
        if module.out_features >= PACK_MIN_OUT_FEATURES and type(module) is MatvecLinear:
            pack = _packing_works() if pack is None else pack
            if pack:
                module.__class__ = PackedHeadLinear  # same module, parameters and hooks; new forward
                cast(PackedHeadLinear, module)._pack()  # (mypy does not follow the __class__ change)
    return model
