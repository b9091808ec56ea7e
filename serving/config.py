"""`ServeConfig`: everything `lmforge serve` and the Ray Serve app builder need, in one validated dataclass.

One schema serves three entry points: the CLI (`--config F` plus flags), the app builder's typed
`args` (a Serve config YAML for `serve run` / KubeRay), and the tests. Secrets never live here:
the config names WHERE API keys come from (an environment variable, a mounted secret file), and
the router replica reads them itself, so keys never travel through Serve's config or logs.

    cfg = load_serve_config("serve.yaml", overrides=["engine.num_slots=16"], model="models:/bot@champion")
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from lmforge import config as config_io
from lmforge.model.config import ConfigError
from lmforge.registry import RegistryError, is_registry_uri, parse_model_uri

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a LoRA adapter's name (BASE:NAME)


def _fail(name: str, rule: str, value: Any) -> None:
    raise ConfigError(f"{name} {rule}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_model_source(name: str, source: str) -> None:
    """A model source is a local directory path or `models:/NAME@ALIAS` / `models:/NAME/VERSION`."""
    if not isinstance(source, str) or not source.strip():
        _fail(name, "must be a model directory or models:/NAME@ALIAS", source)
    if is_registry_uri(source):
        try:
            parse_model_uri(source)
        except RegistryError:
            _fail(name, "must look like models:/NAME@ALIAS or models:/NAME/VERSION", source)


@dataclass
class EngineConfig:
    """The continuous-batching engine inside each model replica (see model/engine.py)."""

    num_slots: int = 8  # sequences decoded together; each holds one preallocated KV-cache row
    max_queue: int = 64  # requests waiting for a slot; beyond it the API answers 503 + Retry-After
    max_model_len: int | None = None  # prompt + completion tokens per sequence (default: the model's context)
    device: str = "auto"  # auto = cuda when the replica has a GPU, else cpu
    dtype: str = "auto"  # auto = bfloat16 on cuda, float32 on cpu; or float32 / bfloat16 / float16
    compile: bool = False  # torch.compile the decode step (static shapes; CUDA graphs on a GPU)
    torch_threads: int | None = None  # intra-op CPU threads per replica (default: torch's choice)

    def __post_init__(self) -> None:
        if not _is_int(self.num_slots) or self.num_slots < 1:
            _fail("engine.num_slots", "must be an integer >= 1", self.num_slots)
        if not _is_int(self.max_queue) or self.max_queue < 0:
            _fail("engine.max_queue", "must be an integer >= 0", self.max_queue)
        if self.max_model_len is not None and (not _is_int(self.max_model_len) or self.max_model_len < 2):
            _fail("engine.max_model_len", "must be None or an integer >= 2", self.max_model_len)
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            _fail("engine.device", "must be auto, cpu, cuda or cuda:N", self.device)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            _fail("engine.dtype", "must be auto, float32, bfloat16 or float16", self.dtype)
        if self.torch_threads is not None and (not _is_int(self.torch_threads) or self.torch_threads < 1):
            _fail("engine.torch_threads", "must be None or an integer >= 1", self.torch_threads)


@dataclass
class AutoscalingConfig:
    """Ray Serve autoscaling of the model deployment, driven by requests in flight per replica."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0  # requests per replica Serve aims for (running + engine-queued)

    def __post_init__(self) -> None:
        if not _is_int(self.min_replicas) or self.min_replicas < 0:
            _fail("autoscaling.min_replicas", "must be an integer >= 0", self.min_replicas)
        if not _is_int(self.max_replicas) or self.max_replicas < max(1, self.min_replicas):
            _fail(
                "autoscaling.max_replicas",
                f"must be an integer >= max(1, min_replicas={self.min_replicas})",
                self.max_replicas,
            )
        if not isinstance(self.target_ongoing_requests, (int, float)) or not self.target_ongoing_requests > 0:
            _fail("autoscaling.target_ongoing_requests", "must be a number > 0", self.target_ongoing_requests)


@dataclass
class ABTestConfig:
    """A second model version receiving a share of the traffic (the first is `model`)."""

    model: str = ""  # version B: a directory or models:/NAME@ALIAS (e.g. @challenger)
    weight: float = 0.1  # share of requests routed to B, in (0, 1); sticky per `user` field when given

    def __post_init__(self) -> None:
        check_model_source("ab_test.model", self.model)
        if not isinstance(self.weight, (int, float)) or not 0 < self.weight < 1:
            _fail(
                "ab_test.weight",
                "must be a number in (0, 1) (the share of traffic for version B)",
                self.weight,
            )


@dataclass
class ServeConfig:
    """How to serve one model (optionally two versions side by side) over HTTP with Ray Serve."""

    # ---- what to serve
    model: str = ""  # a model directory, models:/NAME@ALIAS or models:/NAME/VERSION
    served_model_name: str | None = (
        None  # the id clients send as "model" (default: registry name or dir name)
    )
    fallback_model: str | None = None  # loaded when `model` fails to load (e.g. models:/NAME@previous)
    ab_test: ABTestConfig | None = None
    tracking_uri: str | None = None  # MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI)
    registry_poll_s: float = 30.0  # how often replicas check whether a registry alias moved; 0 = never
    model_cache_dir: str | None = (
        None  # where registry versions are downloaded (default: ~/.cache/lmforge/models)
    )
    # LoRA adapters served on top of `model` (serving/adapters.py): NAME -> adapter directory or a
    # registry URI of an adapter version (models:/NAME@ALIAS); a request selects one with "model": "BASE:NAME"
    adapters: dict[str, str] = field(default_factory=dict)
    max_adapters_per_replica: int = 2  # loaded (merged) adapters per replica, LRU (Serve multiplexing)
    check_adapter_base: bool = True  # refuse an adapter whose recorded base names another model

    # ---- HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    max_body_bytes: int = 1_048_576  # larger request bodies are refused with 413
    default_max_tokens: int = (
        16  # /v1/completions default (OpenAI's); chat defaults to the rest of the context
    )
    retry_after_s: int = 1  # Retry-After seconds sent with 503 (a 429 sends the key's actual wait)

    # ---- authentication (secrets are read by the router, never stored in the config)
    api_keys_env: str = "LMFORGE_API_KEYS"  # env var holding comma-separated keys
    api_keys_file: str | None = None  # mounted secret file: one key per line, '#' comments
    admin_api_keys_env: str = "LMFORGE_ADMIN_API_KEYS"  # keys allowed to call POST /admin/reload
    admin_api_keys_file: str | None = None
    allow_unauthenticated: bool = False  # required to run without keys on a non-loopback host
    rate_limit_per_minute: int = 0  # requests per key per minute per router replica; 0 = unlimited

    # ---- engine and Ray Serve resources
    engine: EngineConfig = field(default_factory=EngineConfig)
    replicas: int = 1  # model replicas (ignored when autoscaling is set)
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int | None = None  # per model replica; default num_slots + max_queue
    max_queued_requests: int = 64  # waiting at the router when every replica is full; then 503
    num_cpus: float = 1.0  # per model replica
    num_gpus: float | None = None  # per model replica; None = 1 when the Ray cluster has GPUs, else 0
    router_replicas: int = 1
    router_num_cpus: float = 0.1

    def __post_init__(self) -> None:
        check_model_source("model", self.model)
        if self.fallback_model is not None:
            check_model_source("fallback_model", self.fallback_model)
        if self.served_model_name is not None and (
            not isinstance(self.served_model_name, str) or not self.served_model_name.strip()
        ):
            _fail("served_model_name", "must be a non-empty string", self.served_model_name)
        if (
            not isinstance(self.registry_poll_s, (int, float))
            or self.registry_poll_s < 0
            or not math.isfinite(self.registry_poll_s)
        ):
            _fail("registry_poll_s", "must be a number >= 0 (0 = no polling)", self.registry_poll_s)
        if not isinstance(self.host, str) or not self.host:
            _fail("host", "must be an address to bind, e.g. 127.0.0.1 or 0.0.0.0", self.host)
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            _fail("port", "must be an integer in [0, 65535]", self.port)
        if not isinstance(self.route_prefix, str) or not self.route_prefix.startswith("/"):
            _fail("route_prefix", "must start with '/'", self.route_prefix)
        for name in ("max_body_bytes", "default_max_tokens", "retry_after_s", "replicas", "router_replicas"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                _fail(name, "must be an integer >= 1", value)
        if not _is_int(self.rate_limit_per_minute) or self.rate_limit_per_minute < 0:
            _fail(
                "rate_limit_per_minute", "must be an integer >= 0 (0 = unlimited)", self.rate_limit_per_minute
            )
        for name in ("api_keys_env", "admin_api_keys_env"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _fail(name, "must name an environment variable", getattr(self, name))
        if self.max_ongoing_requests is not None and (
            not _is_int(self.max_ongoing_requests) or self.max_ongoing_requests < 1
        ):
            _fail("max_ongoing_requests", "must be None or an integer >= 1", self.max_ongoing_requests)
        if not _is_int(self.max_queued_requests) or (
            self.max_queued_requests < 1 and self.max_queued_requests != -1
        ):
            _fail(
                "max_queued_requests", "must be an integer >= 1, or -1 for no limit", self.max_queued_requests
            )
        if not isinstance(self.num_cpus, (int, float)) or self.num_cpus < 0:
            _fail("num_cpus", "must be a number >= 0", self.num_cpus)
        if not isinstance(self.router_num_cpus, (int, float)) or self.router_num_cpus < 0:
            _fail("router_num_cpus", "must be a number >= 0", self.router_num_cpus)
        if self.num_gpus is not None and (not isinstance(self.num_gpus, (int, float)) or self.num_gpus < 0):
            _fail("num_gpus", "must be None (auto) or a number >= 0", self.num_gpus)
        for name, path in self.adapters.items():
            if not isinstance(name, str) or not ADAPTER_NAME.match(name):
                _fail(
                    "adapters",
                    "names must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)",
                    name,
                )
            if not isinstance(path, str) or not path.strip():
                _fail(f"adapters.{name}", "must be an adapter directory or models:/ URI", path)
        if not _is_int(self.max_adapters_per_replica) or self.max_adapters_per_replica < 1:
            _fail("max_adapters_per_replica", "must be an integer >= 1", self.max_adapters_per_replica)

    # ---- derived values
    @property
    def model_max_ongoing_requests(self) -> int:
        """Requests one model replica accepts at once: running slots plus the engine's own queue, so
        overload surfaces as the engine's QueueFull (503 + Retry-After), not as a silent Serve queue."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return self.engine.num_slots + self.engine.max_queue

    @property
    def model_id(self) -> str:
        """The id clients send as "model": served_model_name, else the registry name or directory name."""
        if self.served_model_name:
            return self.served_model_name
        if is_registry_uri(self.model):
            return parse_model_uri(self.model).name
        return os.path.basename(os.path.normpath(self.model))

    @property
    def adapter_ids(self) -> dict[str, str | None]:
        """Every id a request may send as "model" -> its adapter name (None: the base model)."""
        return {self.model_id: None} | {f"{self.model_id}:{name}": name for name in self.adapters}

    @property
    def variants(self) -> dict[str, str]:
        """Variant name -> model source: "a" always, "b" with an A/B test."""
        out = {"a": self.model}
        if self.ab_test is not None:
            out["b"] = self.ab_test.model
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_serve_config(data: dict[str, Any]) -> ServeConfig:
    """Validate a raw mapping (YAML, Serve `args`) into a ServeConfig; errors name the field."""
    return config_io.build(ServeConfig, data)


def load_serve_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, **values: Any
) -> ServeConfig:
    """YAML file (optional) -> `--set key=value` overrides -> explicit values (CLI flags) -> ServeConfig.
    Explicit values that are None are ignored, so unset CLI flags keep the file's or the default value."""
    data = config_io.read_yaml(path) if path is not None else {}
    data = config_io.apply_overrides(data, overrides)
    adapters = values.pop("adapters", None)
    if adapters:  # --adapter NAME=DIR adds to (or replaces by name) the config file's adapters
        current = data.get("adapters") or {}
        if not isinstance(current, dict):
            raise ConfigError(f"adapters must be a mapping NAME: DIR, got {current!r}")
        data["adapters"] = {**current, **adapters}
    data.update({k: v for k, v in values.items() if v is not None})
    return build_serve_config(data)
