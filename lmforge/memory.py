"""This process's resident memory: now, at its peak (CPU runs report these as their memory), and
handing the C heap's free pages back between transformer blocks (`strategy.release_memory_every`).

Why not `resource.getrusage(RUSAGE_SELF).ru_maxrss`: on Linux a child process starts with its
parent's ru_maxrss (the high-water mark lives in the signal struct, which fork copies and exec
keeps), so a training process started by a parent that once held more memory reports the parent's
peak as its own. `VmHWM` in /proc/self/status belongs to the process's address space, which exec
replaces: it is this program's own peak. Elsewhere (macOS) ru_maxrss is the best available.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def resident_gb() -> float:
    """The resident set size now, GB (0.0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 1e9
    except OSError:
        return 0.0


def peak_resident_gb() -> float:
    """The peak resident set size of this program, GB (see the module docstring)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None where the C library has none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


def release_memory_between_blocks(blocks: Iterable[nn.Module], every: int) -> bool:
    """After the forward pass of every `every`-th block, and before its backward pass, hand the C
    heap's free pages back to the OS (glibc `malloc_trim`). False (and nothing done) without glibc.

    Why: on a CPU the activations and temporaries of a training step are mostly a few MB each, so
    glibc serves them from its heap, where the holes left by freed temporaries stay resident: the
    process's peak RSS ends up ~0.5 GB above the tensors alive at any moment on SmolLM2-135M
    (benchmarks/RESULTS.md, Fine-tuning). Trimming returns those holes at the cost of faulting the
    pages in again when they are reused: lower peak memory for a slower step; off by default."""
    trim = _malloc_trim()
    if trim is None:
        return False

    import torch

    @torch.compiler.disable
    def release(*_: object) -> None:
        trim()

    def after_forward(module: nn.Module, args: object, output: object) -> None:
        release()
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(release)  # runs when this block's backward is about to start

    for i, block in enumerate(blocks):
        if i % every == 0:
            block.register_forward_hook(after_forward)
    return True
