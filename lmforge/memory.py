"""This process's resident memory, now and at its peak (CPU runs report these as their memory).

Why not `resource.getrusage(RUSAGE_SELF).ru_maxrss`: on Linux a child process starts with its
parent's ru_maxrss (the high-water mark lives in the signal struct, which fork copies and exec
keeps), so a training process started by a parent that once held more memory reports the parent's
peak as its own. `VmHWM` in /proc/self/status belongs to the process's address space, which exec
replaces: it is this program's own peak. Elsewhere (macOS) ru_maxrss is the best available.
"""

from __future__ import annotations

import resource
import sys


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
