"""lmforge.memory: a process's peak is its own, not the peak its parent had when it started it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge.memory import peak_resident_gb, resident_gb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_child_reports_its_own_peak_not_the_parents() -> None:
    import torch

    big = torch.ones(100 * 2**20)  # 400 MB, touched
    parent_peak = peak_resident_gb()
    assert parent_peak >= resident_gb() >= 0.4
    del big
    code = "from lmforge.memory import peak_resident_gb as p; print(p())"
    child_peak = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert 0 < child_peak < 0.2 < parent_peak  # (ru_maxrss in the child would report >= parent_peak)
