"""s3:// inputs against a real S3 endpoint: a `moto_server` process started here, objects put with
the minio client. The same corpus read from S3 and from disk must give the same dataset."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.components.curate import CurateConfig, curate
from lmforge.errors import UserError

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "curate" / "docs"
BUCKET = "company-docs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = _free_port()
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError as err:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from err
                time.sleep(0.1)
        from minio import Minio

        client = Minio(
            f"127.0.0.1:{port}", access_key="testing", secret_key="testing", secure=False, region="us-east-1"
        )
        client.make_bucket(BUCKET)
        for f in sorted(FIXTURE.rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                client.put_object(
                    BUCKET, f"corpus/{f.relative_to(FIXTURE.parent).as_posix()}", io.BytesIO(data), len(data)
                )
        client.make_bucket("empty-bucket")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LMFORGE_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return s3_endpoint


def test_s3_prefix_gives_the_same_dataset_as_the_local_folder(s3_env: str, tmp_path: Path) -> None:
    cfg = CurateConfig(num_workers=1)
    remote = curate([f"s3://{BUCKET}/corpus/docs"], tmp_path / "remote", cfg, progress=False)
    local = curate([FIXTURE], tmp_path / "local", cfg, progress=False)
    for key in ("documents", "bytes", "rejections", "pii_replacements", "duplicates", "content_sha256"):
        assert remote.datacard[key] == local.datacard[key], key
    assert remote.datacard["documents"] == {"in": 22, "kept": 7, "rejected": 15}
    assert remote.datacard["inputs"][0]["uri"] == f"s3://{BUCKET}/corpus/docs"
    # The trailing slash form names the same objects.
    again = curate([f"s3://{BUCKET}/corpus/docs/"], tmp_path / "again", cfg, progress=False)
    assert again.datacard["content_sha256"] == local.datacard["content_sha256"]


def test_single_object_bucket_root_and_config_credentials(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("LMFORGE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    cfg = CurateConfig(num_workers=1)
    cfg.s3.endpoint, cfg.s3.access_key, cfg.s3.secret_key = (
        s3_endpoint,
        "testing",
        "testing",
    )  # from the config instead
    one = curate([f"s3://{BUCKET}/corpus/docs/guide.md"], tmp_path / "one", cfg, progress=False)
    assert one.datacard["documents"] == {"in": 1, "kept": 1, "rejected": 0}
    assert one.datacard["pii_replacements"]["private_key"] == 1
    root = curate([f"s3://{BUCKET}"], tmp_path / "root", cfg, progress=False)
    assert root.datacard["documents"]["in"] == 22 and root.datacard["config"]["s3"]["secret_key"] == "***"


def test_s3_errors_are_clear_and_early(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        curate(["s3://no-such-bucket/x"], tmp_path / "o1", progress=False)
    with pytest.raises(UserError, match="matched no objects"):
        curate([f"s3://{BUCKET}/corpus/nothing-here"], tmp_path / "o2", progress=False)
    with pytest.raises(UserError, match="matched no objects"):
        curate(["s3://empty-bucket"], tmp_path / "o3", progress=False)
    assert not (tmp_path / "o1").exists()
    monkeypatch.delenv("LMFORGE_S3_ENDPOINT")
    with pytest.raises(UserError, match="LMFORGE_S3_ENDPOINT"):
        curate([f"s3://{BUCKET}/corpus"], tmp_path / "o4", progress=False)
