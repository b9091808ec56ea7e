"""The Ray Serve application: thin deployments over the engine, built from a typed config.

    router (FastAPI ingress: auth, validation, A/B choice, SSE)  --handle-->  model-a replicas
                                                                  --handle-->  model-b replicas (A/B test)

Each model replica is a `ModelServer` (serving/model_server.py: engine, registry polling, hot swap);
the router is an `APIService` (serving/api.py). The Serve decorators are applied here, in
`build_app`, so the classes stay plain Python that the tests run without Ray.

Entry points:
- `lmforge serve ...` calls `run_server(cfg)` (local Ray, or the cluster in RAY_ADDRESS);
- `serve run serving/serve_config.yaml` / a KubeRay RayService use
  `import_path: lmforge.serving.app:app_builder` with the ServeConfig fields as `args`
  (`serve_config(cfg)` writes that YAML).

LoRA adapters (serving/adapters.py): a request for "BASE:NAME" carries NAME as Serve's
`multiplexed_model_id`, so Serve routes it to a replica that has the adapter loaded; in the replica
the adapter loader is wrapped by `serve.multiplexed`, whose per-replica LRU keeps at most
`max_adapters_per_replica` adapters loaded (each merged into a copy of the base, with its own engine).

A client that disconnects closes the router's stream to the replica; `RayBackend.generate` then
cancels the replica call, whose generator cancels the engine request and frees its slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import yaml

from lmforge.devices import check_device
from lmforge.errors import USER_ERRORS, UserError
from lmforge.ray_logs import RayLogs
from lmforge.registry import RegistryClient, is_registry_uri
from lmforge.serving.api import APIService, create_app
from lmforge.serving.auth import Authenticator
from lmforge.serving.config import ServeConfig, build_serve_config
from lmforge.serving.model_server import ModelServer, check_source, fallback_for
from lmforge.serving.protocol import GenerationRequest

log = logging.getLogger("lmforge.serving")

APP_NAME = "lmforge"
REPO_ROOT = Path(__file__).resolve().parents[1]
# A replica being stopped (replaced, scaled down, or the app deleted on shutdown) first lets the
# requests it is running finish, for up to this long.
GRACEFUL_SHUTDOWN_S = 120.0
DRAIN_TIMEOUT_S = 30.0  # `lmforge serve` on SIGTERM: Kubernetes' default terminationGracePeriodSeconds


# ---- deployment bodies (plain classes; decorated in build_app) ---------------------------------
class ModelDeployment:
    """A model replica: one ModelServer, exposed to the router through a DeploymentHandle."""

    def __init__(self, cfg: dict[str, Any], variant: str) -> None:
        from ray import serve

        _configure_logging()
        replica = serve.get_replica_context().replica_tag
        config = build_serve_config(cfg)
        source = None
        if config.adapters and variant == "a":
            # Serve's multiplexing: a per-replica LRU of loaded adapters (evicted ones get __del__), and
            # the loaded adapter ids reported to the routers so requests go where theirs is loaded
            async def load_adapter(name: str):
                return await asyncio.to_thread(self.server.load_adapter, name)

            source = serve.multiplexed(max_num_models_per_replica=config.max_adapters_per_replica)(
                load_adapter
            )
        self.server = ModelServer(config, variant, replica=replica, adapter_source=source)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        async for event in self.server.generate(request):
            yield event

    async def stats(self) -> dict[str, Any]:
        return self.server.stats()

    async def info(self) -> dict[str, Any]:
        return self.server.info()

    async def reload(self, force: bool = False) -> dict[str, Any]:
        return await asyncio.to_thread(self.server.reload, force)

    def check_health(self) -> None:
        self.server.check_health()

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.close()


class RayBackend:
    """The router's view of a model deployment (see serving/api.py `Backend`)."""

    def __init__(self, handle) -> None:
        self.handle = handle

    async def generate(self, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        options: dict[str, Any] = {"stream": True}
        if request.adapter is not None:  # routed to a replica that has this adapter loaded, if any
            options["multiplexed_model_id"] = request.adapter
        response = self.handle.options(**options).generate.remote(request)
        finished = False
        try:
            async for event in response:
                yield event
            finished = True
        finally:
            if not finished:
                # client gone: the replica's generator is cancelled, and with it the engine request
                response.cancel()

    async def stats(self) -> dict[str, Any]:
        return await self.handle.stats.remote()

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()

    async def reload(self, force: bool = False) -> dict[str, Any]:
        return await self.handle.reload.remote(force)


class RouterDeployment:
    """The HTTP ingress: builds the FastAPI app at replica start (`__serve_build_asgi_app__`)."""

    def __init__(self, cfg: dict[str, Any], models: dict[str, Any]) -> None:
        _configure_logging()
        config = build_serve_config(cfg)
        auth = Authenticator.from_config(
            config
        )  # reads the keys here, in the replica; refuses an open non-loopback bind
        log.log(logging.WARNING if auth.open_access else logging.INFO, auth.describe(config.host))
        self.service = APIService(config, {v: RayBackend(h) for v, h in models.items()}, auth=auth)

    def __serve_build_asgi_app__(self):
        return create_app(self.service)


# ---- the builder -------------------------------------------------------------------------------
def gpus_per_replica(cfg: ServeConfig) -> float:
    """cfg.num_gpus, or 1 when the connected Ray cluster has GPUs (0 otherwise)."""
    if cfg.num_gpus is not None:
        return float(cfg.num_gpus)
    import ray

    if not ray.is_initialized():
        return 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def model_deployment_options(cfg: ServeConfig, variant: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": f"lmforge-model-{variant}",
        "max_ongoing_requests": cfg.model_max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": gpus_per_replica(cfg)},
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "health_check_period_s": 10,
    }
    if cfg.autoscaling is not None:
        a = cfg.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = cfg.replicas
    return options


def build_app(cfg: ServeConfig):
    """The Serve application for `cfg` (decorators applied here, from typed arguments)."""
    from ray import serve

    data = cfg.to_dict()
    models = {
        variant: serve.deployment(ModelDeployment)
        .options(**model_deployment_options(cfg, variant))
        .bind(data, variant)
        for variant in cfg.variants
    }
    router = serve.deployment(serve.ingress()(RouterDeployment)).options(
        name="lmforge-router",
        num_replicas=cfg.router_replicas,
        ray_actor_options={"num_cpus": cfg.router_num_cpus},
        max_ongoing_requests=10_000,  # the router only forwards; back-pressure is the model replicas' job
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,  # an open stream keeps its router replica alive
    )
    return router.bind(data, models)


def app_builder(args: dict[str, Any]):
    """`import_path: lmforge.serving.app:app_builder` for `serve run` / KubeRay; `args` are
    ServeConfig fields."""
    return build_app(build_serve_config(dict(args)))


def serve_config(cfg: ServeConfig, app_name: str = APP_NAME) -> dict[str, Any]:
    """A Ray Serve config file (the `serveConfigV2` of a KubeRay RayService) for this ServeConfig."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [
            {
                "name": app_name,
                "route_prefix": cfg.route_prefix,
                "import_path": "lmforge.serving.app:app_builder",
                "args": cfg.to_dict(),
            }
        ],
    }


def serve_config_yaml(cfg: ServeConfig) -> str:
    header = (
        "# Ray Serve config for lmforge (serve run FILE, or a KubeRay RayService's serveConfigV2).\n"
        "# API keys are NOT here: set LMFORGE_API_KEYS on the cluster or mount a secret at api_keys_file.\n"
    )
    return header + yaml.safe_dump(serve_config(cfg), sort_keys=False)


# ---- running it ----------------------------------------------------------------------------------
class DeploymentError(RuntimeError):
    """The Serve application did not start; the message is the root cause, in one line."""


def ray_is_local() -> bool:
    """Whether `lmforge serve` starts Ray on this machine (no $RAY_ADDRESS names a cluster)."""
    return not os.environ.get("RAY_ADDRESS")


def check_models(cfg: ServeConfig, *, local: bool | None = None) -> list[str]:
    """Before Ray starts: every variant can be served, by its model or its fallback. Returns warnings
    (a variant that will start on its fallback); raises a user error when a variant has neither.

    Registry URIs are resolved (not downloaded). Directories and the engine device are checked only
    when Ray is `local` (default: `ray_is_local()`): on a cluster the replicas read paths on their
    own nodes."""
    local = ray_is_local() if local is None else local
    registry: list[RegistryClient] = []

    def client() -> RegistryClient:
        if not registry:
            registry.append(RegistryClient(cfg.tracking_uri))
        return registry[0]

    def check(source: str) -> None:
        if local or is_registry_uri(source):
            check_source(source, client)

    if local:
        check_device(cfg.engine.device, name="engine.device")
    warnings = []
    for variant, source in cfg.variants.items():
        try:
            check(source)
            continue
        except USER_ERRORS as err:
            fallback = fallback_for(cfg, variant)
            if not fallback:
                raise
            primary_error = str(err)
        try:
            check(fallback)
        except USER_ERRORS as err:
            raise UserError(f"{primary_error}; and its fallback {fallback}: {err}") from None
        warnings.append(f"{primary_error}; serving its fallback {fallback} until it can be loaded")
    if cfg.adapters and local:
        check_adapters(cfg)
    elif cfg.adapters:  # on a cluster: registry adapters are resolved here, read by the replicas
        for path in cfg.adapters.values():
            if is_registry_uri(path):
                client().resolve(path)
    return warnings


def check_adapters(cfg: ServeConfig) -> None:
    """Each adapter directory is a PEFT LoRA adapter for the served model (serving/adapters.py). The
    shapes are checked against a model directory; a registry model is checked by name here and by
    shape in the replicas, once downloaded."""
    from lmforge.serving.adapters import check_adapter, local_adapter_dir, model_identities

    base_dir = None if is_registry_uri(cfg.model) else cfg.model
    names = model_identities(cfg.model, base_dir, cfg.served_model_name) | {cfg.model_id}
    for name, path in cfg.adapters.items():
        check_adapter(
            name,
            local_adapter_dir(path, cfg.tracking_uri, cfg.model_cache_dir),
            base_dir=base_dir,
            base_names=names,
            base_label=cfg.model_id,
            check_base=cfg.check_adapter_base,
        )


def run_server(
    cfg: ServeConfig,
    *,
    on_ready: Callable[[], None] | None = None,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    logs: RayLogs | None = None,
    preflight: bool = True,
) -> None:
    """Serve `cfg` until SIGTERM or Ctrl-C, then stop everything this call started.

    1. Preflight, before Ray: the models exist (`check_models`; skipped with `preflight=False` when
       the caller has run it); a user error is one line.
    2. Ray (local, or the cluster in $RAY_ADDRESS) and Serve start, the app deploys (Ray's output goes
       through `logs`); a deployment that fails raises DeploymentError with the replica's root cause.
    3. The first SIGTERM / Ctrl-C drains: the app is deleted, Serve stops taking requests for it and
       every replica finishes the requests it is running, for up to `drain_timeout_s`; a second
       signal stops at once. A signal while Ray or Serve is starting stops at once
       (KeyboardInterrupt); one while the app deploys drains what is already up.
    4. Serve shuts down, then Ray if this call started it (local Ray: raylet, GCS, the dashboard and
       runtime-env agents, workers; none outlives the command). On a cluster ($RAY_ADDRESS) only
       the app is removed and the driver disconnects."""
    import ray
    from ray import serve

    local = ray_is_local()
    if preflight:
        for warning in check_models(cfg, local=local):
            log.warning(warning)
    started_ray = not ray.is_initialized()
    with _StopSignals() as signals, contextlib.ExitStack() as stack:
        if logs is not None:
            stack.enter_context(logs)
        try:
            if started_ray:
                _init_ray(local, capture=logs is not None)
                signals.install()  # ray.init replaced the SIGTERM handler (a native stack dump)
            if logs is not None:
                logs.ray_started()
            serve.start(http_options={"host": cfg.host, "port": cfg.port})
            try:
                serve.run(build_app(cfg), name=APP_NAME, route_prefix=cfg.route_prefix, blocking=False)
            except RuntimeError as err:
                raise DeploymentError(_failure_cause(APP_NAME) or str(err)) from None
            except KeyboardInterrupt:
                # the signal came while serve.run waited for the app: replicas that are up may
                # already be answering requests (the proxy routes before serve.run returns), so
                # drain them like a running app's
                pass
            else:
                if on_ready is not None:
                    on_ready()
            signals.interrupt = False  # from here a signal asks for a drain
            while not signals.received:
                time.sleep(0.2)
            log.info(
                "%s: finishing the requests in flight (up to %.0f s; %s again stops at once)",
                signals.received[0],
                drain_timeout_s,
                signals.received[0],
            )
            unfinished = _drain(APP_NAME, drain_timeout_s, lambda: len(signals.received) > 1)
            if unfinished:
                log.warning("stopping with requests still in flight (%s)", unfinished)
        finally:
            signals.interrupt = False  # a signal during the shutdown must not cut it short
            _shutdown(local=local, started_ray=started_ray)


def _init_ray(local: bool, *, capture: bool) -> None:
    """Local Ray (loopback-only auth, this repo on the workers' path), or the cluster in RAY_ADDRESS.
    Worker output reaches the driver only when `capture` routes it (to a log file, not the console)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not local:
        ray.init(log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        include_dashboard=False,
        log_to_driver=capture,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )


def _failure_cause(app_name: str) -> str | None:
    """The root cause of a failed deployment: the last `Type: message` line of the error Serve
    recorded for it (the replica's traceback), prefixed with the deployment's name."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # Serve itself is broken: the caller falls back to Serve's own message
        return None
    if app is None:
        return None
    for name, deployment in app.deployments.items():
        if str(deployment.status).endswith(("DEPLOY_FAILED", "UNHEALTHY")) and deployment.message:
            return f"deployment {name}: {root_cause(deployment.message)}"
    return root_cause(app.message) if app.message else None


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt): \S.*)$")


def root_cause(message: str) -> str:
    """The last line of a traceback text that names an exception, without its module path
    (`pkg.mod.SomeError: what happened` -> `SomeError: what happened`), or else the last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        match = _EXCEPTION_LINE.match(line)
        if match:
            return match.group(1)
    return lines[-1] if lines else message


def _drain(app_name: str, timeout_s: float, hurry: Callable[[], bool]) -> str | None:
    """Delete the app and wait until Serve has stopped its replicas, each after its requests in
    flight finished (their graceful shutdown). Returns None when drained, else what was left."""
    from ray import serve

    serve.delete(app_name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not hurry():
        app = serve.status().applications.get(app_name)
        if app is None or str(app.status).endswith("NOT_STARTED"):
            return None
        time.sleep(0.2)
    return "stopped early" if hurry() else f"not drained after {timeout_s:.0f} s"


def _shutdown(*, local: bool, started_ray: bool) -> None:
    """On a local Ray, Serve shuts down; on a cluster only this app goes (Serve may be serving other
    apps there). Then Ray: shut down if this call started it (a local Ray: every process it spawned
    is stopped), merely disconnected from a cluster."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
    finally:
        if started_ray:
            ray.shutdown()


class _StopSignals:
    """SIGTERM and SIGINT handling for the server's lifetime.

    While starting (`interrupt`), the first signal stops at once: KeyboardInterrupt, so the
    `finally` blocks shut Ray down. Later, signals are only recorded (`received`): the main loop
    drains on the first and stops waiting on the second. Only the main thread can install
    handlers; elsewhere this does nothing and the default behaviour stays."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.interrupt = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
            self.install()
        return self

    def install(self) -> None:
        if self._previous:
            for signum in self._previous:
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received.append("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _configure_logging() -> None:
    logger = logging.getLogger("lmforge")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
