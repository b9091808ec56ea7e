"""What pretraining leaves for a user: readable artifacts and a readable console.

1. The final model directory, the checkpoints and a consolidated copy follow the process umask
   (0755/0644 by default), not the temp directory's private 0700/0600.
2. On Ray (`lmforge pretrain` as a user runs it, 2 workers), the console shows each progress line
   once and lmforge's own lines, nothing of Ray's internals; those go to <output_dir>/logs/, whose
   path is printed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from _pretrain_data import REPO, build_sample_shards

from lmforge.cli import main as cli_main


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_sample_shards(tmp_path_factory.mktemp("pretrain-output-data"))


def bad_modes(root: Path, mask: int) -> dict[str, str]:
    """Paths under `root` whose permission bits differ from what `mask` gives a new file/directory."""
    found = {}
    for path in [root, *root.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != want:
            found[str(path.relative_to(root))] = f"{mode:o} (want {want:o})"
    return found


def pretrain_args(shards: Path, out: Path, *extra: str) -> list[str]:
    sets = [
        f"data.shards_dir={shards}",
        f"output_dir={out}",
        "schedule.max_steps=4",
        "schedule.warmup_steps=1",
        "checkpoint.every=2",
        "tracking.log_every=2",
        "eval.every=0",
        "tracking.enabled=false",
        "model.overrides.n_layers=1",
    ]
    args = ["pretrain", "--config", str(REPO / "configs" / "pretrain-tiny.yaml"), *extra]
    for s in sets:
        args += ["--set", s]
    return args


def test_trained_and_consolidated_models_are_readable_by_others(shards, tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert cli_main(pretrain_args(shards, out, "--local")) == 0
        assert bad_modes(out / "model", 0o022) == {}
        assert bad_modes(out / "checkpoints", 0o022) == {}
        copy = tmp_path / "consolidated"
        assert cli_main(["consolidate", str(out / "checkpoints" / "step-00000004"), str(copy)]) == 0
        assert bad_modes(copy, 0o022) == {}
    finally:
        os.umask(previous)


@pytest.mark.slow
@pytest.mark.integration
def test_ray_console_shows_progress_once_and_keeps_ray_logs_in_a_file(shards, tmp_path):
    out = tmp_path / "ray-run"
    ray_tmp = Path(f"/tmp/lmf-pt-{os.getpid()}")  # short socket paths, apart from other Rays
    env = {
        **os.environ,
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_AUTH_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "400",  # rich wraps the final summary line at 80 columns when not on a terminal
    }
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lmforge.cli", *pretrain_args(shards, out)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=900,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    console = proc.stdout + proc.stderr
    lines = [line for line in console.splitlines() if line.strip()]
    steps = [line for line in lines if line.startswith("[pretrain] step ")]
    assert [line.split(" (")[0] for line in steps] == ["[pretrain] step 2/4", "[pretrain] step 4/4"], console
    # nothing but lmforge's own lines: no Ray prefixes, no Ray driver logs
    assert all(line.startswith("[pretrain] ") or line.startswith("pretrained ") for line in lines), console
    logs = list((out / "logs").glob("pretrain-*.log"))
    assert len(logs) == 1 and str(logs[0]) in proc.stdout
    text = logs[0].read_text()
    assert "(RayTrainWorker pid=" in text and "Started a local Ray instance" in text
    assert text.count("[pretrain] step 2/4") == 1  # once in the file too: no stderr copy of prints
