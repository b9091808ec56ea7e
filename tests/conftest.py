"""Shared pytest fixtures: repo paths, the sample corpus, and ONE local Ray instance per session.

Ray takes 5-11 s to start on 2 cores, so every test that needs it uses the session-scoped
`ray_local` fixture instead of calling ray.init() itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A local Ray cluster shared by the whole test session (started on first use)."""
    import ray

    if not ray.is_initialized():
        temp_dir = tmp_path_factory.mktemp("ray")
        # Ray's socket paths must stay short (< 108 bytes): use a short dir under /tmp.
        short = Path("/tmp") / f"lmf-ray-{os.getpid()}"
        short.mkdir(exist_ok=True)
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            _temp_dir=str(short),
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
        )
        del temp_dir
    yield ray
    ray.shutdown()
