"""S3 fixtures for the storage tests: a real `moto_server` (an HTTP S3 API in memory) and the
environment lmforge reads to reach it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _net import free_port, stop_process, wait_http

from lmforge.storage import s3_settings

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def moto():
    """A moto S3 server on a free port; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@pytest.fixture
def s3_env(moto, monkeypatch):
    """LMFORGE_S3_ENDPOINT + credentials, and the MLflow/boto3 variables they imply, set for one
    test only."""
    monkeypatch.setenv("LMFORGE_S3_ENDPOINT", moto)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    settings = s3_settings()
    assert settings is not None
    for key, value in settings.env().items():
        monkeypatch.setenv(key, value)
    return settings
