"""The MLflow model registry as lmforge uses it: model directories in, `models:/NAME@ALIAS` out.

A registered version is a model directory (config.json, model.safetensors, tokenizer files) logged as
the artifacts of an MLflow run under `model/`, then registered with `create_model_version`, so any
MLflow server (sqlite + local folder on a laptop, Postgres + MinIO on a cluster) can hold it and
nothing needs an MLflow "flavor". Promotion is an alias move (MLflow 3 aliases; stages are
deprecated): `set_alias("bot", "champion", 3)`; servers resolve `models:/bot@champion` and notice
when it points elsewhere.

This module is generic (no serving logic): the serving replicas resolve and download through it,
and a `lmforge registry` command can list, register and promote through the same functions.

    client = RegistryClient("sqlite:////abs/mlflow.db")
    version = client.register_model_dir("out/model", "bot", alias="champion")
    local_dir = client.download(client.resolve("models:/bot@champion"))
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import UserError
from lmforge.tracking import default_artifact_root, default_tracking_uri, experiment_id

if TYPE_CHECKING:
    from mlflow import MlflowClient

SCHEME = "models:/"
DEFAULT_EXPERIMENT = "lmforge-models"
ARTIFACT_PATH = "model"  # where the model directory sits inside the run's artifacts
_COMPLETE = ".lmforge-download-complete"


class RegistryError(UserError):
    """A registry URI is malformed, or names a model, version or alias the registry does not hold."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""

    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.name}@{self.alias}" if self.alias else f"{SCHEME}{self.name}/{self.version}"


@dataclass(frozen=True)
class ResolvedVersion:
    """One concrete registered version (what an alias pointed to when it was resolved)."""

    name: str
    version: str
    source: str  # artifact URI of the model directory
    alias: str | None = None
    run_id: str | None = None

    @property
    def label(self) -> str:
        """Short human/metric label: `bot/3`."""
        return f"{self.name}/{self.version}"


def is_registry_uri(source: str) -> bool:
    return source.startswith(SCHEME)


def parse_model_uri(uri: str) -> ModelRef:
    if not is_registry_uri(uri):
        raise RegistryError(
            f"{uri!r} is not a registry URI (expected models:/NAME@ALIAS or models:/NAME/VERSION)"
        )
    rest = uri[len(SCHEME) :]
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in alias:
            return ModelRef(name, alias=alias)
    else:
        name, _, version = rest.rpartition("/")
        if name and version.isdigit():
            return ModelRef(name, version=version)
    raise RegistryError(f"{uri!r} is malformed: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_MODEL_CACHE", Path.home() / ".cache" / "lmforge" / "models"))


class RegistryClient:
    """Thin, typed wrapper over `mlflow.MlflowClient` for the operations lmforge needs."""

    def __init__(self, tracking_uri: str | None = None, artifact_root: str | None = None) -> None:
        """`artifact_root`: where new experiments keep their artifacts (a folder or s3://bucket/prefix);
        default: the server's own setting, or an `artifacts/` folder beside a sqlite database (without
        one MLflow would write to ./mlruns in the current directory)."""
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.artifact_root = (
            artifact_root if artifact_root is not None else default_artifact_root(self.tracking_uri)
        )
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        """The MLflow client, made on first use: making it opens (and for sqlite, creates) the store,
        which a read of a store that does not exist must not do (see `_require_store`)."""
        if self._client is None:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            from mlflow import MlflowClient  # imported here: mlflow is slow to import

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def _require_store(self, ref: ModelRef) -> None:
        """Reading from an sqlite store that does not exist yet is a user error, said in one line
        (MLflow would first create an empty database, printing its migrations, then fail)."""
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            if not db.is_file():
                raise RegistryError(
                    f"cannot resolve {ref.uri}: there is no model registry at {db} yet "
                    "(register a model first, e.g. with `lmforge run`, or set MLFLOW_TRACKING_URI)"
                )

    # ---- reading ------------------------------------------------------------------------------
    def resolve(self, ref: ModelRef | str) -> ResolvedVersion:
        """The version an alias (or explicit version) points to right now."""
        from mlflow.exceptions import MlflowException

        ref = parse_model_uri(ref) if isinstance(ref, str) else ref
        self._require_store(ref)
        try:
            if ref.alias is not None:
                mv = self.client.get_model_version_by_alias(ref.name, ref.alias)
            else:
                assert ref.version is not None  # a ModelRef names an alias or a version
                mv = self.client.get_model_version(ref.name, ref.version)
        except MlflowException as err:
            raise RegistryError(
                f"cannot resolve {ref.uri} in the registry at {self.tracking_uri}: {err.message}"
            ) from err
        assert mv.source is not None  # MLflow creates no version without a source
        return ResolvedVersion(ref.name, str(mv.version), mv.source, ref.alias, mv.run_id)

    def aliases(self, name: str) -> dict[str, str]:
        """Alias -> version for one registered model."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(name)
        except MlflowException as err:
            raise RegistryError(
                f"no registered model {name!r} at {self.tracking_uri}: {err.message}"
            ) from err
        return {alias: str(version) for alias, version in (model.aliases or {}).items()}

    def versions(self, name: str) -> list[str]:
        return sorted(
            (str(mv.version) for mv in self.client.search_model_versions(f"name='{name}'")), key=int
        )

    def download(self, version: ResolvedVersion, cache_dir: str | os.PathLike | None = None) -> Path:
        """The version's model directory on local disk (downloaded once per version into the cache,
        atomically: a half-finished download is never mistaken for a model)."""
        import mlflow.artifacts

        root = Path(cache_dir) if cache_dir else default_cache_dir()
        target = root / _safe(version.name) / version.version
        if (target / _COMPLETE).is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version.version}.", dir=target.parent))
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source, dst_path=str(tmp), tracking_uri=self.tracking_uri
                )
            )
            if not (local / "config.json").is_file():
                raise RegistryError(
                    f"{version.label} ({version.source}) holds no model directory (config.json missing)"
                )
            (local / _COMPLETE).write_text(version.source + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(local, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    # ---- writing ------------------------------------------------------------------------------
    def register_model_dir(
        self,
        model_dir: str | os.PathLike,
        name: str,
        *,
        alias: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> ResolvedVersion:
        """Log `model_dir` as a run's artifacts and register it as the next version of `name`."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise RegistryError(f"{model_dir} is not a model directory (config.json missing)")
        from mlflow.exceptions import MlflowException

        run = self.client.create_run(
            experiment_id(self.client, experiment, self.artifact_root),
            run_name=run_name or f"register-{name}",
            tags=tags or {},
        )
        try:
            self.client.log_artifacts(run.info.run_id, str(model_dir), artifact_path=ARTIFACT_PATH)
            self.client.set_terminated(run.info.run_id, "FINISHED")
        except BaseException:
            self.client.set_terminated(run.info.run_id, "FAILED")
            raise
        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
        mv = self.client.create_model_version(name, source=source, run_id=run.info.run_id, tags=tags or {})
        if alias:
            self.set_alias(name, alias, str(mv.version))
        return ResolvedVersion(name, str(mv.version), source, alias, run.info.run_id)

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        """Point `alias` at `version` (a promotion); serving replicas follow at their next poll."""
        self.client.set_registered_model_alias(name, alias, str(version))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
