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


def test_release_between_blocks_runs_in_forward_and_backward_and_changes_no_number(monkeypatch) -> None:
    import copy

    import torch

    import lmforge.memory as memory
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer, apply_activation_checkpointing

    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda: calls.append(1))
    torch.manual_seed(0)
    plain = Transformer(ModelConfig.from_name("tiny", vocab_size=300, n_layers=4))
    released = apply_activation_checkpointing(copy.deepcopy(plain))
    assert memory.release_memory_between_blocks(released.model.layers, every=2)
    ids = torch.randint(0, 300, (2, 9))
    losses = []
    for model in (plain, released):
        loss = model(ids, targets=ids)
        loss.backward()
        losses.append(loss)
    assert len(calls) == 2 * 2  # blocks 0 and 2: after the forward, before the backward
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(plain.parameters(), released.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_release_is_refused_without_glibc_and_validated_in_config(monkeypatch) -> None:
    import lmforge.memory as memory
    from lmforge.components.pretrain.config import StrategySection
    from lmforge.errors import ConfigError

    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_memory_between_blocks([], every=1) is False
    with pytest.raises(ConfigError, match="strategy.release_memory_every must be an integer >= 0"):
        StrategySection(release_memory_every=-1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_real_malloc_trim_is_found_on_linux() -> None:
    import lmforge.memory as memory

    trim = memory._malloc_trim()
    assert trim is not None
    trim()
