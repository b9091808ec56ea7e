"""One served variant: load its model (or the fallback), follow registry alias moves, hot-swap.

This is the body of a Ray Serve model replica (serving/app.py applies the decorator) and of the
in-process server used by tests, so both run the same code.

Hot swap: a new version is downloaded and loaded NEXT to the running one (its own engine), then
becomes current in one assignment; requests already running keep the runner they started on, and
that runner's engine stops only when its last request has finished. Nothing in flight is dropped.

Model sources, in order: the variant's `model`; when it cannot be loaded, `fallback_model` (and
the replica keeps trying the primary at each poll, so a fixed registry entry brings it back).

LoRA adapters (variant "a" only; serving/adapters.py): a request with `adapter` set runs on that
adapter's own merged model and engine, which `adapter_source` provides (Serve's multiplexing LRU in
a Ray replica, a `LocalAdapterCache` in-process); the adapters are checked against the base at start.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from lmforge.errors import InputNotFoundError, UserError
from lmforge.model.checkpoint import read_config, weight_files
from lmforge.registry import RegistryClient, ResolvedVersion, is_registry_uri, parse_model_uri
from lmforge.serving.adapters import (
    AdapterSource,
    LoadedAdapter,
    LocalAdapterCache,
    check_adapter,
    local_adapter_dir,
    merge_adapter,
    model_identities,
)
from lmforge.serving.config import ServeConfig
from lmforge.serving.protocol import APIError, GenerationRequest
from lmforge.serving.runner import ModelRunner, pick_device, pick_dtype

log = logging.getLogger("lmforge.serving")


class ModelLoadError(RuntimeError):
    """Neither the model nor its fallback could be loaded."""


def fallback_for(cfg: ServeConfig, variant: str) -> str | None:
    """The source a variant loads when its own cannot be loaded: `fallback_model`; version B also
    falls back to version A, so a broken challenger never takes the service down."""
    return cfg.fallback_model if variant == "a" else (cfg.fallback_model or cfg.model)


def check_source(source: str, registry: Callable[[], RegistryClient]) -> str:
    """Check, without loading any weights, that a replica could load `source`; returns its label.

    Run before Ray starts (see `serving.app.check_models`), so a missing directory, an incomplete
    one or an unknown registry alias is one line at once, not a replica failing three times
    minutes later. Raises a user error (`UserError` / `ConfigError`) naming what is wrong."""
    if is_registry_uri(source):
        return registry().resolve(parse_model_uri(source)).label
    path = Path(source)
    if not path.is_dir():
        raise InputNotFoundError(f"model directory {path} does not exist")
    read_config(path)  # config.json present, valid, and an architecture lmforge can run
    weight_files(path)  # safetensors present (pickled-only checkpoints are refused)
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"{path} has no tokenizer.json: the server needs the model's own tokenizer")
    return path.resolve().name


def _unknown_adapter(name: str) -> APIError:
    return APIError(
        404, f"adapter {name!r} is not served here", "invalid_request_error", "model", "model_not_found"
    )


class ModelServer:
    def __init__(
        self,
        cfg: ServeConfig,
        variant: str = "a",
        *,
        replica: str = "local",
        poll: bool = True,
        adapter_source: AdapterSource | None = None,
    ) -> None:
        self.cfg, self.variant, self.replica = cfg, variant, replica
        self.source = cfg.variants[variant]
        self.fallback = fallback_for(cfg, variant)
        self._registry: RegistryClient | None = None
        self._swap_lock = threading.Lock()  # one load/swap at a time
        self.current: ModelRunner
        self.current_version: ResolvedVersion | None = None
        self.serving_fallback = False
        self.reloads = 0
        self._aborted_before = 0  # client disconnects counted by runners already swapped out
        self._draining: list[ModelRunner] = []  # swapped-out versions still finishing requests
        self.last_error: str | None = None
        self._load_initial()
        self.adapters = dict(cfg.adapters) if variant == "a" else {}  # name -> adapter directory
        self._loaded_adapters: weakref.WeakSet[LoadedAdapter] = weakref.WeakSet()
        if self.adapters:
            self._check_adapters()
        self._adapter_source = (
            adapter_source or LocalAdapterCache(self.load_adapter, cfg.max_adapters_per_replica).get
        )
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if poll and cfg.registry_poll_s > 0 and (is_registry_uri(self.source) or self.serving_fallback):
            self._poller = threading.Thread(
                target=self._poll_loop, name=f"lmforge-registry-poll-{variant}", daemon=True
            )
            self._poller.start()

    # ---- loading ------------------------------------------------------------------------------
    @property
    def registry(self) -> RegistryClient:
        if self._registry is None:
            self._registry = RegistryClient(self.cfg.tracking_uri)
        return self._registry

    def _locate(self, source: str) -> tuple[Path, str, ResolvedVersion | None]:
        """A source -> (local model directory, label, registry version or None)."""
        if is_registry_uri(source):
            version = self.registry.resolve(parse_model_uri(source))
            return self.registry.download(version, self.cfg.model_cache_dir), version.label, version
        path = Path(source)
        if not path.is_dir():
            raise InputNotFoundError(f"model directory {path} does not exist")
        return path, path.resolve().name, None

    def _load(self, source: str) -> tuple[ModelRunner, ResolvedVersion | None]:
        model_dir, label, version = self._locate(source)
        runner = ModelRunner.load(
            model_dir, self.cfg.engine, label=label, source=source, replica=self.replica
        )
        return runner, version

    def _load_initial(self) -> None:
        try:
            self.current, self.current_version = self._load(self.source)
            log.info("variant %s: serving %s", self.variant, self.current.info.label)
            return
        except Exception as err:  # any failure to load the primary is a reason to try the fallback
            primary_error = f"{type(err).__name__}: {err}"
            if not self.fallback:
                raise ModelLoadError(f"cannot load model {self.source}: {primary_error}") from err
        log.warning(
            "variant %s: cannot load %s (%s); loading the fallback %s",
            self.variant,
            self.source,
            primary_error,
            self.fallback,
        )
        try:
            self.current, self.current_version = self._load(self.fallback)
        except Exception as err:
            raise ModelLoadError(
                f"cannot load model {self.source} ({primary_error}) nor its fallback "
                f"{self.fallback} ({type(err).__name__}: {err})"
            ) from err
        self.serving_fallback = True
        self.last_error = primary_error

    # ---- LoRA adapters ------------------------------------------------------------------------
    def _check_adapters(self) -> None:
        """Each adapter fits the base this replica serves (on its fallback: checked when it is used)."""
        if self.serving_fallback:
            log.warning("variant a serves its fallback: adapters are checked when a request uses them")
            return
        info = self.current.info
        for name, path in self.adapters.items():
            check_adapter(
                name,
                local_adapter_dir(path, self.cfg.tracking_uri, self.cfg.model_cache_dir),
                base_dir=info.model_dir,
                base_names=self._base_names(),
                base_label=info.label,
                check_base=self.cfg.check_adapter_base,
            )
        log.info("variant a: adapters %s checked against %s", sorted(self.adapters), info.label)

    def _base_names(self) -> set[str]:
        names = model_identities(self.source, self.current.info.model_dir, self.cfg.served_model_name)
        return names | {self.cfg.model_id, self.current.info.label}

    def _adapter_runner(self, name: str, base: ModelRunner) -> ModelRunner:
        """Adapter `name` merged into `base`'s weights, with its own engine."""
        path = local_adapter_dir(
            self.adapters[name], self.cfg.tracking_uri, self.cfg.model_cache_dir
        )  # a registry URI: downloaded
        check_adapter(  # again: the base may have been swapped since the start
            name,
            path,
            base_dir=base.info.model_dir,
            base_names=self._base_names(),
            base_label=base.info.label,
            check_base=self.cfg.check_adapter_base,
        )
        device = pick_device(self.cfg.engine.device)
        model = merge_adapter(base.info.model_dir, path, device, pick_dtype(self.cfg.engine.dtype, device))
        runner = ModelRunner.load(
            base.info.model_dir,
            self.cfg.engine,
            label=f"{base.info.label}:{name}",
            source=path,
            replica=self.replica,
            model=model,
        )
        log.info("adapter %s: merged into %s, engine started", name, base.info.label)
        return runner

    def load_adapter(self, name: str) -> LoadedAdapter:
        """Load adapter `name` (merge + engine) for the current base: what Serve's multiplexed loader runs."""
        if name not in self.adapters:
            raise _unknown_adapter(name)
        loaded = LoadedAdapter(name, lambda base: self._adapter_runner(name, base))
        base = self.current
        loaded.acquire(base).release()  # build it now, so the cost is the load's, not the first request's
        self._loaded_adapters.add(loaded)
        return loaded

    def _adapter_runners(self) -> list[ModelRunner]:
        return [a.runner for a in list(self._loaded_adapters) if not a.closed and a.runner is not None]

    async def _acquire_adapter(self, name: str) -> ModelRunner:
        if name not in self.adapters:
            raise _unknown_adapter(name)
        try:
            loaded = await self._adapter_source(name)
            return await asyncio.to_thread(loaded.acquire, self.current)
        except UserError as err:  # it no longer fits the base (a swap to another architecture)
            raise APIError(
                503,
                f"adapter {name} cannot be used now: {err}",
                "overloaded_error",
                None,
                "adapter_unavailable",
            ) from err

    def reload(self, force: bool = False) -> dict[str, Any]:
        """Check the source now and swap in a new version if there is one (or if `force`).
        A registry alias is re-resolved; a directory is reloaded only when forced."""
        with self._swap_lock:
            old = self.current
            before = old.info.label
            try:
                if is_registry_uri(self.source):
                    version = self.registry.resolve(parse_model_uri(self.source))
                    changed = (
                        self.serving_fallback
                        or self.current_version is None
                        or version.version != self.current_version.version
                    )
                else:
                    changed = self.serving_fallback
                if changed or force:
                    runner, version = self._load(self.source)
                    self._swap(runner, version)
                    self.serving_fallback = False
                self.last_error = None
            except Exception as err:
                self.last_error = f"{type(err).__name__}: {err}"
                log.error(
                    "variant %s: reload of %s failed, still serving %s: %s",
                    self.variant,
                    self.source,
                    before,
                    self.last_error,
                )
            return {
                "variant": self.variant,
                "before": before,
                "model": self.current.info.label,
                "swapped": self.current is not old,
                "error": self.last_error,
            }

    def _swap(self, runner: ModelRunner, version: ResolvedVersion | None) -> None:
        old = self.current
        self.current, self.current_version = runner, version  # new requests go to the new version from here
        self.reloads += 1
        self._aborted_before += old.aborted
        self._draining = [r for r in self._draining if r.active] + [old]
        log.info("variant %s: swapped %s -> %s", self.variant, old.info.label, runner.info.label)
        old.retire()  # its engine stops once the requests still running on it are done

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.cfg.registry_poll_s):
            self.reload()

    def close(self) -> None:
        self._stop.set()
        self.current.retire()
        for loaded in list(self._loaded_adapters):
            loaded.close()

    # ---- requests -----------------------------------------------------------------------------
    def _acquire(self) -> ModelRunner:
        for _ in range(100):  # a swap can retire the runner between reading and acquiring it
            runner = self.current
            if runner.acquire():
                return runner
            time.sleep(0.001)
        raise APIError(
            503, "the model is being swapped; retry", "overloaded_error", headers={"Retry-After": "1"}
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        try:
            runner = (
                self._acquire() if request.adapter is None else await self._acquire_adapter(request.adapter)
            )
        except APIError as err:
            yield err.event()
            return
        try:
            async for event in runner.generate(request):
                if "stats" in event:
                    if self.adapters:  # several engines: report the replica's total
                        event["stats"] = self.stats()
                    else:
                        event["stats"]["aborted"] += self._aborted_before
                yield event
        finally:
            runner.release()

    def stats(self) -> dict[str, Any]:
        """The replica's engines together (the base's, plus one per loaded adapter)."""
        stats = self.current.stats()
        for runner in self._adapter_runners():
            extra = runner.stats()
            for key in ("queue_depth", "running", "num_slots", "aborted"):
                stats[key] += extra[key]
        stats["kv_cache_usage"] = stats["running"] / stats["num_slots"]
        return stats | {
            "variant": self.variant,
            "reloads": self.reloads,
            "aborted": stats["aborted"] + self._aborted_before,
        }

    def info(self) -> dict[str, Any]:
        i = self.current.info
        return {
            "variant": self.variant,
            "model": i.label,
            "source": self.source,
            "model_dir": i.model_dir,
            "serving_fallback": self.serving_fallback,
            "max_model_len": i.max_model_len,
            "num_slots": i.num_slots,
            "device": i.device,
            "dtype": i.dtype,
            "loaded_at": i.loaded_at,
            "reloads": self.reloads,
            "last_error": self.last_error,
            "replica": self.replica,
            "adapters_loaded": sorted(a.name for a in list(self._loaded_adapters) if not a.closed),
            "draining": [
                {"model": r.info.label, "active_requests": r.active} for r in self._draining if r.active
            ],
        }

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if not self.current.healthy:
            raise RuntimeError(f"the generation engine of {self.current.info.label} stopped after an error")
