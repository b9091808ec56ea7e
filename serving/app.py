"""The Ray Serve application: thin deployments over the engine, built from a typed config.

    router (FastAPI ingress: auth, validation, A/B choice, SSE)  --handle-->  model-a replicas
                                                                  --handle-->  model-b replicas (A/B test)

Each model replica is a `ModelServer` (serving/model_server.py: engine, registry polling, hot swap);
the router is an `APIService` (serving/api.py). The Serve decorators are applied here, in
`build_app`, so the classes stay plain Python that the tests run without Ray.

Entry points:
- `lmforge serve ...` calls `run_server(cfg)` (local Ray, or the cluster in RAY_ADDRESS);
- `serve run serving/serve_config.yaml` / a KubeRay RayService use `import_path: lmforge.serving.app:app_builder`
  with the ServeConfig fields as `args` (`serve_config(cfg)` writes that YAML).

A client that disconnects closes the router's stream to the replica; `RayBackend.generate` then
cancels the replica call, whose generator cancels the engine request and frees its slots.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from lmforge.serving.api import APIService, create_app
from lmforge.serving.auth import Authenticator
from lmforge.serving.config import ServeConfig, build_serve_config
from lmforge.serving.model_server import ModelServer
from lmforge.serving.protocol import GenerationRequest

log = logging.getLogger("lmforge.serving")

APP_NAME = "lmforge"
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- deployment bodies (plain classes; decorated in build_app) ---------------------------------
class ModelDeployment:
    """A model replica: one ModelServer, exposed to the router through a DeploymentHandle."""

    def __init__(self, cfg: dict[str, Any], variant: str) -> None:
        from ray import serve

        _configure_logging()
        replica = serve.get_replica_context().replica_tag
        self.server = ModelServer(build_serve_config(cfg), variant, replica=replica)

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
        response = self.handle.options(stream=True).generate.remote(request)
        finished = False
        try:
            async for event in response:
                yield event
            finished = True
        finally:
            if not finished:
                response.cancel()  # client gone: the replica's generator is cancelled, and with it the engine request

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
        "graceful_shutdown_timeout_s": 120,  # let running generations finish when a replica is replaced
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
    )
    return router.bind(data, models)


def app_builder(args: dict[str, Any]):
    """`import_path: lmforge.serving.app:app_builder` for `serve run` / KubeRay: `args` are ServeConfig fields."""
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
def run_server(cfg: ServeConfig, *, block: bool = True, on_ready=None) -> None:
    """Start Ray Serve (local Ray, or the cluster in RAY_ADDRESS), deploy the app, serve until Ctrl-C."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
            ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=cfg.route_prefix, blocking=False)
    if on_ready is not None:
        on_ready()
    if not block:
        return
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def _configure_logging() -> None:
    logger = logging.getLogger("lmforge")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
