"""The MLflow model registry as lmforge uses it: model directories in, `models:/NAME@ALIAS` out.

A registered version is a model directory (config.json, model.safetensors, tokenizer files) logged as
the artifacts of an MLflow run under `model/`, with an `MLmodel` file beside config.json: the folder
is at once an lmforge model directory and an MLflow Model whose `python_function` flavor loads it
into the lmforge engine (`lmforge.serving.mlflow_model`, named here, never imported), so

    mlflow.pyfunc.load_model("models:/bot@champion").predict({"prompt": "Hi"}, params={"max_tokens": 8})
    mlflow models serve -m models:/bot@champion --env-manager local

work, and `lmforge serve` / `lmforge evaluate` download the same folder. Any MLflow server (sqlite +
local folder on a laptop, Postgres + MinIO on a cluster) can hold it.

Versions carry tags: lineage (`data_hash`, `tokenizer_hash`, `base_model`, `code_version`,
`pipeline_run_id`), the evaluation verdict `gate` = passed|failed and `eval.TASK.METRIC` (written by
`lmforge evaluate`). Promotion is an alias move (MLflow 3 aliases; stages are deprecated):
`promote("bot", 3, "champion")` refuses a version whose gate failed unless `force=True` (recorded on
the version); every move of an alias is appended to the registered model's tag
`alias_history.ALIAS`, which `rollback("bot", "champion")` walks back. Servers resolve
`models:/bot@champion` and notice when it points elsewhere.

This module is generic (no serving logic): the serving replicas resolve and download through it,
and `lmforge registry list|promote|rollback` and the pipeline call the same functions.

    client = RegistryClient("sqlite:////abs/mlflow.db")
    version = client.register_model_dir("out/model", "bot", alias="challenger",
                                        lineage={"data_hash": "...", "pipeline_run_id": "..."}, gate=True)
    client.promote("bot", version.version, "champion")     # PromotionRefused if its gate failed
    client.rollback("bot", "champion")                     # back to the previous champion
    local_dir = client.download(client.resolve("models:/bot@champion"))
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import UserError
from lmforge.storage import configure_mlflow
from lmforge.tracking import default_artifact_root, default_tracking_uri, experiment_id

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature

SCHEME = "models:/"
DEFAULT_EXPERIMENT = "lmforge-models"
ARTIFACT_PATH = "model"  # where the model directory sits inside the run's artifacts
_COMPLETE = ".lmforge-download-complete"
PYFUNC_LOADER = "lmforge.serving.mlflow_model"  # the pyfunc flavor's loader_module (see that module)
LINEAGE_KEYS = ("data_hash", "tokenizer_hash", "base_model", "code_version", "pipeline_run_id")
GATE_TAG = "gate"  # passed | failed (set at registration, or by `lmforge evaluate` on the version)
HISTORY_TAG = "alias_history."  # + alias: JSON list of the versions it pointed to, oldest first
HISTORY_LIMIT = 100
PYFUNC_DEFAULT_PARAMS = {"max_tokens": 64, "temperature": 0.0}  # the signature's params and defaults


class RegistryError(UserError):
    """A registry URI is malformed, or names a model, version or alias the registry does not hold."""


class PromotionRefused(RegistryError):
    """The version's evaluation gate failed and the promotion was not forced."""


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


@dataclass(frozen=True)
class VersionInfo:
    """One version as `lmforge registry list` shows it."""

    version: str
    aliases: list[str]
    gate: str | None  # passed | failed | None (never evaluated with a gate)
    metrics: dict[str, str]  # eval.TASK.METRIC tags, without the "eval." prefix
    lineage: dict[str, str]
    tags: dict[str, str]
    created: int  # milliseconds since the epoch
    source: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    aliases: dict[str, str]  # alias -> version
    versions: list[VersionInfo] = field(default_factory=list)
    alias_history: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class AliasMove:
    """What a promote or rollback did: `alias` moved from `previous` to `version`."""

    name: str
    alias: str
    version: str
    previous: str | None
    forced: bool = False

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.name}@{self.alias}"


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
            configure_mlflow()  # MinIO as MLflow's S3 artifact store when LMFORGE_S3_ENDPOINT is set
            from mlflow import MlflowClient  # imported here: mlflow is slow to import

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def _require_store(self, ref: ModelRef) -> None:
        self.require_store(f"cannot resolve {ref.uri}: ")

    def require_store(self, context: str = "") -> None:
        """Reading from an sqlite store that does not exist yet is a user error, said in one line
        (MLflow would first create an empty database, printing its migrations, then fail)."""
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            if not db.is_file():
                raise RegistryError(
                    f"{context}there is no model registry at {db} yet "
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

    def download(
        self,
        version: ResolvedVersion,
        cache_dir: str | os.PathLike | None = None,
        *,
        marker_file: str = "config.json",
    ) -> Path:
        """The version's model directory on local disk (downloaded once per version into the cache,
        atomically: a half-finished download is never mistaken for a model). A cached copy is used
        only when it came from this version's source: another store's version with the same name and
        number (a registry deleted and filled again) is downloaded afresh. `marker_file`: the file that
        makes the download what the caller expects (`adapter_config.json` for a LoRA adapter version)."""
        import mlflow.artifacts

        root = Path(cache_dir) if cache_dir else default_cache_dir()
        target = root / _safe(version.name) / version.version
        marker = target / _COMPLETE
        if marker.is_file() and marker.read_text(encoding="utf-8").strip() == version.source:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version.version}.", dir=target.parent))
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source, dst_path=str(tmp), tracking_uri=self.tracking_uri
                )
            )
            if not (local / marker_file).is_file():
                what = "LoRA adapter" if marker_file == "adapter_config.json" else "model directory"
                raise RegistryError(
                    f"{version.label} ({version.source}) holds no {what} ({marker_file} missing)"
                )
            (local / _COMPLETE).write_text(version.source + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(local, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def list_models(self, name: str | None = None) -> list[ModelInfo]:
        """Registered models (one, or all) with their versions, aliases, gate results, metrics, lineage."""
        from mlflow.exceptions import MlflowException

        if name is not None:
            try:
                models = [self.client.get_registered_model(name)]
            except MlflowException as err:
                raise RegistryError(
                    f"no registered model {name!r} at {self.tracking_uri}: {err.message}"
                ) from err
        else:
            models = list(self.client.search_registered_models(max_results=1000))
        out = []
        for model in sorted(models, key=lambda m: m.name):
            aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
            by_version: dict[str, list[str]] = {}
            for alias, version in sorted(aliases.items()):
                by_version.setdefault(version, []).append(alias)
            versions = []
            for mv in self.client.search_model_versions(f"name='{_quote(model.name)}'"):
                tags = dict(mv.tags or {})
                versions.append(
                    VersionInfo(
                        version=str(mv.version),
                        aliases=by_version.get(str(mv.version), []),
                        gate=tags.get(GATE_TAG),
                        metrics={
                            k.removeprefix("eval."): v for k, v in tags.items() if k.startswith("eval.")
                        },
                        lineage={k: tags[k] for k in LINEAGE_KEYS if k in tags},
                        tags=tags,
                        created=int(mv.creation_timestamp or 0),
                        source=str(mv.source),
                    )
                )
            versions.sort(key=lambda v: int(v.version))
            history = {
                k.removeprefix(HISTORY_TAG): _history(v)
                for k, v in (model.tags or {}).items()
                if k.startswith(HISTORY_TAG)
            }
            out.append(ModelInfo(model.name, aliases, versions, history))
        return out

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
        lineage: dict[str, str | None] | None = None,
        gate: bool | None = None,
    ) -> ResolvedVersion:
        """Log `model_dir` (+ an `MLmodel` with the pyfunc flavor) as a run's artifacts and register it
        as the next version of `name`.

        `lineage`: keys from LINEAGE_KEYS (None values are skipped; `code_version` defaults to the
        lmforge version), set as tags on the run and the version. `gate`: the evaluation verdict,
        tag `gate` = passed|failed (`promote` refuses a failed one). `alias` is set without a gate check
        (use `promote` for a checked move)."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise RegistryError(f"{model_dir} is not a model directory (config.json missing)")
        unknown = sorted(set(lineage or {}) - set(LINEAGE_KEYS))
        if unknown:
            raise RegistryError(f"unknown lineage keys {unknown}: expected some of {list(LINEAGE_KEYS)}")
        from mlflow.exceptions import MlflowException

        from lmforge import __version__

        all_tags = {"code_version": __version__, **{k: str(v) for k, v in (lineage or {}).items() if v}}
        if gate is not None:
            all_tags[GATE_TAG] = "passed" if gate else "failed"
        all_tags.update(tags or {})
        run = self.client.create_run(
            experiment_id(self.client, experiment, self.artifact_root),
            run_name=run_name or f"register-{name}",
            tags=all_tags,
        )
        try:
            self.client.log_artifacts(run.info.run_id, str(model_dir), artifact_path=ARTIFACT_PATH)
            with tempfile.TemporaryDirectory(prefix="lmforge-mlmodel-") as tmp:
                write_mlmodel(Path(tmp) / "m")
                self.client.log_artifacts(run.info.run_id, str(Path(tmp) / "m"), artifact_path=ARTIFACT_PATH)
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
        mv = self.client.create_model_version(name, source=source, run_id=run.info.run_id, tags=all_tags)
        if alias:
            self.set_alias(name, alias, str(mv.version))
        return ResolvedVersion(name, str(mv.version), source, alias, run.info.run_id)

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        """Point `alias` at `version` (no gate check) and append it to the alias history; serving
        replicas follow at their next poll."""
        self.client.set_registered_model_alias(name, alias, str(version))
        history = self._alias_history(name, alias)
        if not history or history[-1] != str(version):
            history.append(str(version))
        self._save_history(name, alias, history)

    def promote(
        self, name: str, version: str | int, alias: str = "champion", *, force: bool = False, reason: str = ""
    ) -> AliasMove:
        """Move `alias` to `version`. A version whose tag `gate` is `failed` is refused
        (PromotionRefused) unless `force`; a forced promotion is recorded on the version (tag
        `forced_promotion.ALIAS`: who, when, why)."""
        mv = self._version(name, version)
        previous = self.aliases(name).get(alias)
        gate_failed = (mv.tags or {}).get(GATE_TAG) == "failed"
        if gate_failed and not force:
            raise PromotionRefused(
                f"{name}/{version} failed its evaluation gate (tag gate=failed): not promoted to "
                f"{alias!r}; promote it anyway with --force (force=True), which is recorded on the version"
            )
        if gate_failed:
            note = {"by": _user(), "at": _now(), "reason": reason, "previous": previous}
            self.client.set_model_version_tag(
                name, str(version), f"forced_promotion.{alias}", json.dumps(note)
            )
        self.set_alias(name, alias, str(version))
        return AliasMove(name, alias, str(version), previous, forced=gate_failed)

    def rollback(self, name: str, alias: str = "champion") -> AliasMove:
        """Move `alias` back to the version that held it before the current one (from the alias
        history; versions deleted since are skipped). RegistryError when there is none."""
        current = self.aliases(name).get(alias)
        if current is None:
            raise RegistryError(f"{name} has no alias {alias!r} to roll back")
        history = self._alias_history(name, alias)
        while history and history[-1] == current:
            history.pop()
        existing = set(self.versions(name))
        while history and (history[-1] not in existing or history[-1] == current):
            history.pop()
        if not history:
            raise RegistryError(
                f"{name}@{alias} (version {current}) has no earlier holder to roll back to "
                f"(alias history tag {HISTORY_TAG}{alias})"
            )
        previous = history[-1]
        self.client.set_registered_model_alias(name, alias, previous)
        self._save_history(name, alias, history)
        self.client.set_model_version_tag(
            name, current, f"rolled_back.{alias}", json.dumps({"by": _user(), "at": _now(), "to": previous})
        )
        return AliasMove(name, alias, previous, current)

    def _version(self, name: str, version: str | int) -> ModelVersion:
        from mlflow.exceptions import MlflowException

        if not str(version).isdigit():
            raise RegistryError(f"version must be a number, got {version!r}")
        try:
            return self.client.get_model_version(name, str(version))
        except MlflowException as err:
            raise RegistryError(
                f"no version {version} of {name!r} at {self.tracking_uri}: {err.message}"
            ) from err

    def _alias_history(self, name: str, alias: str) -> list[str]:
        model = self.client.get_registered_model(name)
        return _history((model.tags or {}).get(HISTORY_TAG + alias))

    def _save_history(self, name: str, alias: str, history: list[str]) -> None:
        value = json.dumps(history[-HISTORY_LIMIT:])
        self.client.set_registered_model_tag(name, HISTORY_TAG + alias, value)


# ---- the MLflow Model files ------------------------------------------------------------------
def model_signature() -> ModelSignature:
    """Prompt text or chat messages in, generated text out; params max_tokens and temperature."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Object, ParamSchema, ParamSpec, Property, Schema

    defaults = PYFUNC_DEFAULT_PARAMS

    message = Array(Object([Property("role", DataType.string), Property("content", DataType.string)]))
    return ModelSignature(
        inputs=Schema(
            [ColSpec(DataType.string, "prompt", required=False), ColSpec(message, "messages", required=False)]
        ),
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema(
            [
                ParamSpec("max_tokens", DataType.long, defaults["max_tokens"]),
                ParamSpec("temperature", DataType.double, defaults["temperature"]),
            ]
        ),
    )


def write_mlmodel(path: str | os.PathLike) -> Path:
    """Write the MLflow Model files (MLmodel with the pyfunc flavor, signature, input example,
    requirements) into the new folder `path`; copied beside a model directory's config.json they make
    it loadable with `mlflow.pyfunc.load_model`."""
    import pandas as pd  # type: ignore[import-untyped]

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow.pyfunc

    from lmforge import __version__

    example = (pd.DataFrame({"prompt": ["Hello"]}), {"max_tokens": 16, "temperature": 0.0})
    mlflow.pyfunc.save_model(
        str(path),
        loader_module=PYFUNC_LOADER,
        signature=model_signature(),
        input_example=example,
        pip_requirements=[f"lmforge=={__version__}"],
    )
    return Path(path)


def _history(value: str | None) -> list[str]:
    try:
        found = json.loads(value) if value else []
    except json.JSONDecodeError:
        return []
    return [str(v) for v in found] if isinstance(found, list) else []


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
