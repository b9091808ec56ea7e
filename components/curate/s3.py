"""S3/MinIO access for `s3://bucket/prefix` inputs, through the `minio` client.

Settings come from the config's `s3` section, else from the environment: `LMFORGE_S3_ENDPOINT`
(e.g. `http://minio.lmforge:9000` or `minio:9000`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION`/`AWS_DEFAULT_REGION`. Settings are resolved once in the parent process and handed to the
workers, which each build their own client (clients hold connection pools that must not be forked).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

from lmforge.components.curate.config import S3Config
from lmforge.errors import UserError


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # host:port
    access_key: str | None
    secret_key: str | None
    region: str
    secure: bool


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UserError(f"{uri!r} is not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.lstrip("/")


def resolve_settings(cfg: S3Config) -> S3Settings:
    endpoint = cfg.endpoint or os.environ.get("LMFORGE_S3_ENDPOINT")
    if not endpoint:
        raise UserError(
            "an s3:// input needs an endpoint: set s3.endpoint in the config or LMFORGE_S3_ENDPOINT"
        )
    secure = cfg.secure
    if "://" in endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(f"s3.endpoint {endpoint!r} must look like host:port or http(s)://host:port")
        if secure is None:
            secure = parsed.scheme == "https"
        endpoint = parsed.netloc
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return S3Settings(
        endpoint=endpoint,
        access_key=cfg.access_key or os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=cfg.secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=region,
        secure=True if secure is None else secure,
    )


def make_client(settings: S3Settings):
    from minio import Minio

    return Minio(
        settings.endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        secure=settings.secure,
        region=settings.region,
    )


def list_objects(client, uri: str) -> list[tuple[str, str, int]]:
    """(bucket, key, size) of the objects an input URI names, sorted by key.

    `s3://b/path` names the object `path` if it exists, else every object under `path/` (like a local
    file or folder); `s3://b` names the whole bucket. Errors (no bucket, no access, nothing found)
    are UserErrors raised before any work starts."""
    from minio.error import S3Error
    from urllib3.exceptions import HTTPError

    bucket, prefix = split_uri(uri)
    try:
        if not client.bucket_exists(bucket):
            raise UserError(f"input {uri}: bucket {bucket!r} does not exist")
        objects = []
        if prefix and not prefix.endswith("/"):
            try:
                stat = client.stat_object(bucket, prefix)
                return [(bucket, prefix, int(stat.size))]
            except S3Error as err:
                if err.code not in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    raise
            prefix += "/"
        for obj in client.list_objects(bucket, prefix=prefix or None, recursive=True):
            if obj.is_dir or obj.object_name.endswith("/"):
                continue
            objects.append((bucket, obj.object_name, int(obj.size or 0)))
    except S3Error as err:
        raise UserError(f"input {uri}: S3 error {err.code}: {err.message}") from err
    except (OSError, HTTPError) as err:  # connection refused, DNS, TLS
        raise UserError(f"input {uri}: cannot reach the S3 endpoint: {err}") from err
    if not objects:
        raise UserError(f"input {uri} matched no objects")
    return sorted(objects, key=lambda o: o[1])
