"""S3 / MinIO storage: one place that reads the endpoint and credentials, and the helpers that use them.

Configured by the environment, never by code (the Helm chart sets these; nothing is needed locally):

    LMFORGE_S3_ENDPOINT        http://minio.lmforge:9000   (unset: no S3, every path is local)
    AWS_ACCESS_KEY_ID          or AWS_ACCESS_KEY_ID_FILE=/var/run/secrets/minio/accesskey
    AWS_SECRET_ACCESS_KEY      or AWS_SECRET_ACCESS_KEY_FILE=/var/run/secrets/minio/secretkey
    AWS_SESSION_TOKEN          or AWS_SESSION_TOKEN_FILE (optional)
    AWS_DEFAULT_REGION         (default us-east-1; MinIO ignores it)

A `*_FILE` variable names a file holding the value (a mounted Kubernetes Secret); the plain variable
wins when both are set. Secrets are never logged: `S3Settings` hides them in its repr and errors
name the variable or file, never the value.

What uses it:
- `ray_storage("s3://bucket/ckpt")` -> `("bucket/ckpt", pyarrow S3FileSystem)` for Ray Train's
  `RunConfig(storage_path=..., storage_filesystem=...)`: checkpoints in MinIO when a pretraining or
  fine-tuning config sets `checkpoint.storage: s3://...` (components/pretrain/trainer.py);
- `upload_dir` / `download_dir`: curated data, shards, model directories, to and from `s3://`;
- (not here: the KFP pipeline root, `lmforge pipeline ... --pipeline-root s3://...`, is written by
  the KFP backend's launcher with its own S3 settings; pipelines/pipeline.py)
- `configure_mlflow()`: exports `MLFLOW_S3_ENDPOINT_URL` and the AWS variables boto3 reads, so an
  MLflow client or `mlflow server --artifacts-destination s3://...` stores artifacts in MinIO.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import InputNotFoundError, UserError

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem, S3FileSystem  # type: ignore[import-untyped]

ENDPOINT_ENV = "LMFORGE_S3_ENDPOINT"
S3_SCHEME = "s3://"


class StorageError(UserError):
    """S3 is misconfigured (endpoint, credentials) or a storage URI is malformed."""


@dataclass(frozen=True)
class S3Settings:
    """Where the S3 API is and how to sign requests (secrets kept out of repr and logs)."""

    endpoint: str  # http(s)://host:port
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str = "us-east-1"

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise StorageError(f"{ENDPOINT_ENV} must start with http:// or https://, got {self.endpoint!r}")

    @property
    def scheme(self) -> str:
        return self.endpoint.split("://", 1)[0]

    @property
    def host(self) -> str:
        """host:port, as pyarrow's endpoint_override wants it."""
        return self.endpoint.split("://", 1)[1].rstrip("/")

    def filesystem(self) -> S3FileSystem:
        """A pyarrow S3 filesystem for this endpoint (Ray Train storage, directory copies)."""
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            session_token=self.session_token,
            region=self.region,
            endpoint_override=self.host,
            scheme=self.scheme,
            allow_bucket_creation=True,
        )

    def env(self) -> dict[str, str]:
        """The variables MLflow and boto3 read (for os.environ or a subprocess such as `mlflow server`)."""
        out = {
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }
        if self.session_token:
            out["AWS_SESSION_TOKEN"] = self.session_token
        return out


def s3_settings(environ: Mapping[str, str] | None = None) -> S3Settings | None:
    """The S3 settings from the environment; None when LMFORGE_S3_ENDPOINT is not set."""
    env = os.environ if environ is None else environ
    endpoint = env.get(ENDPOINT_ENV, "").strip()
    if not endpoint:
        return None
    access = _secret(env, "AWS_ACCESS_KEY_ID")
    secret = _secret(env, "AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        missing = [n for n, v in (("AWS_ACCESS_KEY_ID", access), ("AWS_SECRET_ACCESS_KEY", secret)) if not v]
        raise StorageError(
            f"{ENDPOINT_ENV} is set but {' and '.join(missing)} is not: set it, or NAME_FILE to a file "
            "holding it (a mounted secret)"
        )
    return S3Settings(
        endpoint,
        access,
        secret,
        _secret(env, "AWS_SESSION_TOKEN"),
        env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
    )


def require_s3(settings: S3Settings | None = None) -> S3Settings:
    found = settings or s3_settings()
    if found is None:
        raise StorageError(f"an s3:// path needs {ENDPOINT_ENV} (and credentials) to be set")
    return found


def configure_mlflow(settings: S3Settings | None = None) -> bool:
    """Export MLFLOW_S3_ENDPOINT_URL and AWS credentials into os.environ (values already set there
    are kept) so MLflow's S3 artifact store reaches MinIO; False when S3 is not configured."""
    settings = settings or s3_settings()
    if settings is None:
        return False
    for key, value in settings.env().items():
        os.environ.setdefault(key, value)
    return True


# ---- paths ------------------------------------------------------------------------------------
def is_s3_uri(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    if not is_s3_uri(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket (expected s3://BUCKET/PREFIX)")
    return bucket, key.strip("/")


def ray_storage(uri: str | os.PathLike, settings: S3Settings | None = None) -> tuple[str, FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: an s3:// URI becomes
    "bucket/prefix" on the configured S3 filesystem; anything else an absolute local path."""
    if not is_s3_uri(uri):
        return str(Path(uri).resolve()), None
    bucket, key = split_s3_uri(str(uri))
    return f"{bucket}/{key}".rstrip("/"), require_s3(settings).filesystem()


def upload_dir(local_dir: str | os.PathLike, uri: str, settings: S3Settings | None = None) -> str:
    """Copy a local directory (recursively) to `s3://bucket/prefix`; the bucket is created if missing."""
    local = Path(local_dir)
    if not local.is_dir():
        raise InputNotFoundError(f"{local} is not a directory")
    from pyarrow.fs import LocalFileSystem, copy_files

    bucket, key = split_s3_uri(uri)
    fs = require_s3(settings).filesystem()
    fs.create_dir(bucket, recursive=False)
    dest = f"{bucket}/{key}".rstrip("/")
    copy_files(str(local.resolve()), dest, source_filesystem=LocalFileSystem(), destination_filesystem=fs)
    return f"{S3_SCHEME}{dest}"


def download_dir(uri: str, local_dir: str | os.PathLike, settings: S3Settings | None = None) -> Path:
    """Copy everything under `s3://bucket/prefix` into `local_dir` (created); InputNotFoundError if
    nothing is there."""
    from pyarrow.fs import FileSelector, FileType, LocalFileSystem, copy_files

    bucket, key = split_s3_uri(uri)
    fs = require_s3(settings).filesystem()
    src = f"{bucket}/{key}".rstrip("/")
    try:
        found = fs.get_file_info(FileSelector(src, recursive=False, allow_not_found=True))
    except OSError as err:
        raise StorageError(f"cannot list {uri}: {err}") from err
    if not found and fs.get_file_info(src).type != FileType.Directory:
        raise InputNotFoundError(f"nothing at {uri}")
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    copy_files(src, str(local.resolve()), source_filesystem=fs, destination_filesystem=LocalFileSystem())
    return local


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """$NAME, else the content of the file $NAME_FILE names (stripped); the value is never shown."""
    value = env.get(name)
    if value:
        return value
    path = env.get(f"{name}_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except OSError as err:
        raise StorageError(f"{name}_FILE={path}: cannot read it ({err.strerror})") from None
