"""S3/MinIO storage: settings from the environment or mounted secret files, directory copies, Ray
Train's storage filesystem, and MLflow's artifact store on S3 (client side, and a real `mlflow server`
with --artifacts-destination s3://). `moto_server` is the S3 endpoint (a real HTTP S3 API in memory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _net import free_port, stop_process, wait_http

from lmforge.errors import InputNotFoundError
from lmforge.storage import (
    S3Settings,
    StorageError,
    download_dir,
    ray_storage,
    s3_settings,
    split_s3_uri,
    upload_dir,
)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
BIN = Path(sys.executable).parent


# ---- settings ---------------------------------------------------------------------------------
def test_settings_from_environment_and_secret_files(tmp_path, monkeypatch):
    assert s3_settings({}) is None  # not configured: everything stays local
    (tmp_path / "access").write_text("AKIA-FROM-FILE\n")
    (tmp_path / "secret").write_text("s3cr3t-from-file\n")
    env = {
        "LMFORGE_S3_ENDPOINT": "http://minio.lmforge:9000",
        "AWS_ACCESS_KEY_ID_FILE": str(tmp_path / "access"),
        "AWS_SECRET_ACCESS_KEY_FILE": str(tmp_path / "secret"),
    }
    settings = s3_settings(env)
    assert settings is not None
    assert (settings.access_key, settings.secret_key) == ("AKIA-FROM-FILE", "s3cr3t-from-file")
    assert (settings.host, settings.scheme, settings.region) == ("minio.lmforge:9000", "http", "us-east-1")
    assert "s3cr3t" not in repr(settings) and "AKIA" not in repr(settings)  # never logged
    assert settings.env()["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.lmforge:9000"
    assert s3_settings({**env, "AWS_ACCESS_KEY_ID": "plain"}).access_key == "plain"  # variable wins

    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY is not") as err:
        s3_settings({"LMFORGE_S3_ENDPOINT": "http://x:9000", "AWS_ACCESS_KEY_ID": "k"})
    assert "k" not in str(err.value).split("is not")[1].split(":")[0]
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID_FILE=.*cannot read it"):
        s3_settings({**env, "AWS_ACCESS_KEY_ID_FILE": str(tmp_path / "missing")})
    with pytest.raises(StorageError, match="must start with http"):
        S3Settings("minio:9000", "a", "b")
    assert split_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    with pytest.raises(StorageError, match="names no bucket"):
        split_s3_uri("s3:///prefix")
    monkeypatch.delenv("LMFORGE_S3_ENDPOINT", raising=False)
    with pytest.raises(StorageError, match="needs LMFORGE_S3_ENDPOINT"):
        upload_dir(tmp_path, "s3://bucket/x")


# ---- directories and Ray storage on S3 --------------------------------------------------------
def test_upload_download_and_ray_storage_on_s3(s3_env, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 100)
    assert upload_dir(src, "s3://lmforge-data/models/m1") == "s3://lmforge-data/models/m1"
    back = download_dir("s3://lmforge-data/models/m1", tmp_path / "back")
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == [
        "config.json",
        "sub/weights.bin",
    ]
    assert (back / "sub" / "weights.bin").read_bytes() == (src / "sub" / "weights.bin").read_bytes()
    with pytest.raises(InputNotFoundError, match="nothing at"):
        download_dir("s3://lmforge-data/models/none", tmp_path / "none")
    with pytest.raises(InputNotFoundError):
        upload_dir(tmp_path / "missing", "s3://lmforge-data/x")

    path, fs = ray_storage("s3://lmforge-data/checkpoints/run1")
    assert path == "lmforge-data/checkpoints/run1" and fs is not None
    with fs.open_output_stream(f"{path}/probe.txt") as f:  # what Ray Train does with its checkpoints
        f.write(b"ok")
    with fs.open_input_stream(f"{path}/probe.txt") as f:
        assert f.read() == b"ok"
    assert ray_storage(tmp_path / "ckpt") == (str((tmp_path / "ckpt").resolve()), None)


# ---- MLflow's artifact store on S3 ------------------------------------------------------------
def test_registry_with_artifacts_on_s3_from_the_client(s3_env, tmp_path, tokenizer_dir):
    """sqlite registry, artifacts written by the client straight to S3 (MLFLOW_S3_ENDPOINT_URL)."""
    from test_registry_models import make_model_dir

    from lmforge.registry import RegistryClient

    model_dir = make_model_dir(tmp_path, tokenizer_dir, 0)
    upload_dir(tmp_path / "model-0", "s3://mlflow-client/seed")  # creates the bucket
    client = RegistryClient(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root="s3://mlflow-client/art")
    version = client.register_model_dir(model_dir, "s3bot", alias="champion")
    assert version.source.startswith("s3://mlflow-client/art/")
    local = client.download(client.resolve("models:/s3bot@champion"), tmp_path / "cache")
    assert (local / "MLmodel").is_file()
    assert (local / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_server_with_s3_artifact_store(s3_env, tmp_path, tokenizer_dir):
    """A real `mlflow server --artifacts-destination s3://...` on moto: register, load back with
    pyfunc, promote and roll back through the server."""
    import mlflow.pyfunc
    import pandas as pd
    from pyarrow.fs import FileSelector
    from test_registry_models import greedy, make_model_dir

    from lmforge.registry import PromotionRefused, RegistryClient

    upload_dir(tmp_path, "s3://mlflow-server/.keep")  # the bucket must exist
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "wb")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            "s3://mlflow-server/artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=log,
        stderr=log,
        cwd=tmp_path,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", proc, timeout=300)  # ~9 s idle; minutes on a loaded 2-core machine
        model_dir = make_model_dir(tmp_path, tokenizer_dir, 0)
        client = RegistryClient(uri)
        client.register_model_dir(model_dir, "srv", alias="champion", gate=True, lineage={"data_hash": "h1"})
        client.register_model_dir(model_dir, "srv", alias="challenger", gate=False)

        stored = s3_env.filesystem().get_file_info(FileSelector("mlflow-server/artifacts", recursive=True))
        names = {Path(f.path).name for f in stored}
        assert {"MLmodel", "config.json", "model.safetensors"} <= names  # the artifacts are in S3

        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model("models:/srv@champion")
        out = model.predict(pd.DataFrame({"prompt": ["Hello"]}), params={"max_tokens": 5})
        assert out == [greedy(model_dir, "Hello", 5)]

        with pytest.raises(PromotionRefused):
            client.promote("srv", 2, "champion")
        assert client.promote("srv", 2, "champion", force=True).forced
        assert client.rollback("srv", "champion").version == "1"
        info = client.list_models("srv")[0]
        assert info.aliases == {"champion": "1", "challenger": "2"}
        assert info.versions[0].lineage["data_hash"] == "h1"
    finally:
        stop_process(proc)
        log.close()
        print((tmp_path / "mlflow-server.log").read_text()[-2000:])  # shown when the test fails
