"""Shared pytest fixtures: repo paths, the sample corpus, THE tiny test tokenizer, and ONE local Ray
instance per session.

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


# The corpus of the tiny test tokenizer: English, accents, emoji, code. Characters it never saw (CJK)
# encode as single bytes, so some tokens hold part of a character.
TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving language models over HTTP with continuous batching.",
    "Héllo wörld: naïve café, déjà vu, and emoji 🙂 in UTF-8.",
    "def add(a, b):\n    return a + b\n",
    "Private domain-specific models for support tickets and manuals.",
] * 20


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The one tiny test tokenizer, trained by lmforge's own tokenizer stage (byte-level BPE, 400 ids:
    <|bos|>=0 <|eos|>=1 <|pad|>=2 <|im_start|>=3 <|im_end|>=4, a ChatML chat template), saved as a
    tokenizer directory (tokenizer.json, tokenizer_config.json, ...). Tests that need a tokenizer use
    this one (or `tokenizer`, the same files loaded)."""
    from lmforge.components.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(
        iter(TOKENIZER_TEXTS),
        out,
        vocab_size=400,
        min_frequency=2,
        holdout_fraction=0.0,
        reference_tokenizers=[],
    )
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """The tiny test tokenizer as a `tokenizers.Tokenizer`."""
    from lmforge.tokenizer_files import load_tokenizer

    return load_tokenizer(tokenizer_dir)


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


# Process-wide settings a test may change and must not leave behind: `mlflow.set_tracking_uri(URL)`
# also exports MLFLOW_TRACKING_URI (for subprocesses), and lmforge.storage exports S3 settings, so a
# test that talked to a server it has since stopped would send every later test's MLflow calls there.
LEAKY_ENV_PREFIXES = ("MLFLOW_", "AWS_", "LMFORGE_S3_")


@pytest.fixture(autouse=True)
def _restore_mlflow_and_s3_settings():
    import sys

    def mlflow_uri() -> str | None:
        if "mlflow" not in sys.modules:
            return None
        from mlflow.tracking._tracking_service import utils

        return utils._tracking_uri

    env_before = {k: v for k, v in os.environ.items() if k.startswith(LEAKY_ENV_PREFIXES)}
    uri_before = mlflow_uri()
    yield
    if "mlflow" in sys.modules and mlflow_uri() != uri_before:
        from mlflow.tracking._tracking_service import utils

        utils.set_tracking_uri(uri_before)  # None also unsets MLFLOW_TRACKING_URI
    for key in [k for k in os.environ if k.startswith(LEAKY_ENV_PREFIXES) and k not in env_before]:
        del os.environ[key]
    os.environ.update(env_before)
