"""The one check of a device a user names (`--device`, `engine.device`): valid, and present here.

`torch.device("bogus")` raises a bare RuntimeError, and a well-formed device that this machine
lacks (`cuda` on a CPU-only host, `cuda:7` with one GPU) fails much later, deep inside a weight
load. Every place that takes a device from a user calls `check_device` first, so either case is one
line naming the flag, before any work starts.

    device = check_device(args.device)            # torch.device("cpu"), or a UserError
    check_device(cfg.engine.device, name="engine.device")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmforge.errors import UserError

if TYPE_CHECKING:
    import torch

CHOICES = "auto, cpu, cuda, cuda:N or mps"


def check_device(spec: str, *, name: str = "--device") -> torch.device:
    """The torch device for `spec` ("auto" = cuda when available, then mps, else cpu), or a
    UserError naming `name` when the spec is malformed or the device is not on this machine."""
    import torch  # here, not at import time: the CLI's --help must stay fast

    spec = str(spec).strip()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"{name} {spec}: not a device; use {CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "no GPU is visible" if torch.version.cuda else "this torch build has no CUDA support"
            raise UserError(f"{name} {spec}: no CUDA device is available ({why}); use {name} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(
                f"{name} {spec}: there is no such CUDA device ({count} visible: cuda:0..cuda:{count - 1})"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise UserError(f"{name} {spec}: the Apple MPS backend is not available here; use {name} cpu")
        return device
    raise UserError(f"{name} {spec}: lmforge does not run on {device.type!r} devices; use {CHOICES}")


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
