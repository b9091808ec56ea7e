"""LoRA adapters served per request: `lmforge serve --adapter NAME=DIR`, selected by the OpenAI `model`
field (`BASE` is the base model, `BASE:NAME` the base with adapter NAME; all listed in /v1/models).

An adapter is a standard PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`),
as `lmforge finetune` or `peft`'s `save_pretrained` writes it.

Design: one merged model per loaded adapter. Loading adapter NAME merges it into a fresh copy of the
base weights (peft `merge_and_unload`, in fp32 on the CPU, then moved to the engine's device and
dtype) and starts a continuous-batching engine of its own on that copy (`LoadedAdapter`). A batch
therefore only ever holds requests for one set of weights, so requests for different adapters can
never be mixed up, and decoding runs at the base model's speed (no per-token LoRA matmuls), with the
same outputs as `lmforge merge` + serving the merged model. The price is a full weight copy and a KV
cache per loaded adapter, which is why the number loaded at once is bounded: Ray Serve's model
multiplexing (`serve.multiplexed`, serving/app.py) keeps at most `max_adapters_per_replica` of them
per replica in an LRU, unloads the least recently used one (its engine stops once the requests still
running on it have finished) and routes a request to a replica that already has its adapter loaded.
In-process (tests, no Ray) `LocalAdapterCache` is the same bounded LRU.

When the base model is hot-swapped (a registry alias moved), a loaded adapter re-merges into the new
base on its next request; requests already running finish on the old merge.

Checks (before Ray starts, `check_adapter`, and again in each replica against the base it loaded):
the files exist and are a PEFT LoRA adapter stored as safetensors; every LoRA tensor targets a Linear
module the base has, with matching shapes (a different architecture or size is refused, listing the
valid target modules); and the base recorded in adapter_config.json (`base_model_name_or_path`), when
there is one, names the served model (its directory, registry name, served name or the checkpoint it
was imported from; `check_adapter_base: false` skips only this name check).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import InputNotFoundError, UserError
from lmforge.registry import RegistryError, is_registry_uri, parse_model_uri
from lmforge.serving.config import ADAPTER_NAME

log = logging.getLogger("lmforge.serving")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
NAME_PATTERN = ADAPTER_NAME
# peft's key for a LoRA factor: base_model.model.<module path>.lora_A.weight (adapter name removed)
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def check_adapter_name(name: Any, where: str = "adapters") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise UserError(
            f"{where}: adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit); requests select it as model 'BASE:NAME'"
        )
    return name


def parse_adapter_args(items: Iterable[str]) -> dict[str, str]:
    """`--adapter NAME=DIR` (or NAME=models:/...) values -> {NAME: DIR}; a malformed or repeated NAME
    is a UserError."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path.strip():
            raise UserError(
                f"--adapter {item!r} must look like NAME=DIR or NAME=models:/MODEL@ALIAS "
                "(e.g. support=out/ft/adapter)"
            )
        check_adapter_name(name, "--adapter")
        if name in out:
            raise UserError(f"--adapter {name} is given twice ({out[name]} and {path})")
        out[name] = path
    return out


def local_adapter_dir(source: str, tracking_uri: str | None = None, cache_dir: str | None = None) -> str:
    """An adapter's directory on this machine: `source` itself, or for a registry URI
    (`models:/NAME@ALIAS`, `models:/NAME/VERSION`: an adapter registered by `lmforge finetune` with
    `register.model_name`) the version the URI points to now, downloaded once into the registry cache.
    Called where the adapter is read: before Ray starts (the checks) and on the replica that loads it,
    so an alias moved in between is followed by the next load (an LRU miss), not by loaded adapters."""
    if not is_registry_uri(source):
        return source
    from lmforge.registry import RegistryClient

    registry = RegistryClient(tracking_uri)
    return str(registry.download(registry.resolve(source), cache_dir, marker_file=CONFIG_FILE))


# ---- reading and checking an adapter directory ----------------------------------------------------
@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int | None
    alpha: float | None
    target_modules: Any  # as written in adapter_config.json: a list of names or a regex
    base: str | None  # adapter_config.json base_model_name_or_path (None when not recorded)


def read_adapter(name: str, path: str | os.PathLike) -> AdapterInfo:
    """Read an adapter directory's config; refuse anything that is not a PEFT LoRA adapter in safetensors."""
    d = Path(path)
    where = f"adapter {name} ({d})"
    if not d.is_dir():
        raise InputNotFoundError(f"{where}: the directory does not exist")
    cfg_file = d / CONFIG_FILE
    if not cfg_file.is_file():
        raise UserError(f"{where}: {CONFIG_FILE} is missing; is this a PEFT adapter directory?")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: {CONFIG_FILE} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: {CONFIG_FILE} must hold a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise UserError(
            f"{where}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters (LORA) are served"
        )
    if not (d / WEIGHTS_FILE).is_file():
        found = "adapter_model.bin (pickle: refused)" if (d / "adapter_model.bin").is_file() else "nothing"
        raise UserError(f"{where}: {WEIGHTS_FILE} is missing (found {found})")
    base = cfg.get("base_model_name_or_path")
    return AdapterInfo(
        name,
        str(d),
        cfg.get("r"),
        cfg.get("lora_alpha"),
        cfg.get("target_modules"),
        base if isinstance(base, str) and base.strip() else None,
    )


def _identities(ref: str) -> set[str]:
    """The names one model reference goes by: itself, a registry URI's model name, a path's last part
    and its resolved absolute path."""
    ref = ref.strip().rstrip("/")
    out = {ref}
    if is_registry_uri(ref):
        try:
            out.add(parse_model_uri(ref).name)
        except RegistryError:
            pass
    elif ref:
        out.add(os.path.basename(os.path.normpath(ref)))
        p = Path(ref).expanduser()
        if p.exists():
            out.add(str(p.resolve()))
    return {x for x in out if x}


def model_identities(source: str, model_dir: str | os.PathLike | None, served_name: str | None) -> set[str]:
    """The names the served model goes by (see `_identities`), for matching an adapter's recorded base:
    the configured source, its local directory (not a registry download's cache path), the served
    model name, and the checkpoint it was imported from (lmforge.json `imported_from`)."""
    names = _identities(source)
    if served_name:
        names.add(served_name)
    if model_dir is not None:
        if not is_registry_uri(source):
            names |= _identities(str(model_dir))
        meta_file = Path(model_dir) / "lmforge.json"
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        except (OSError, json.JSONDecodeError):
            meta = {}
        if isinstance(meta, dict) and isinstance(meta.get("imported_from"), str):
            names |= _identities(meta["imported_from"])
    return names


def check_recorded_base(info: AdapterInfo, served: set[str], served_label: str) -> None:
    """The base recorded in the adapter must be one of the served model's names (when recorded)."""
    if info.base is None or _identities(info.base) & served:
        return
    raise UserError(
        f"adapter {info.name} ({info.path}) was trained on base {info.base!r}, but the served model is "
        f"{served_label!r}; serve it with its own base (or, if that is the same model under another name, "
        "set check_adapter_base: false)"
    )


def check_fits(info: AdapterInfo, base_dir: str | os.PathLike) -> None:
    """Every LoRA factor targets a Linear module of the base with the right shape (no weights loaded:
    the base is built on the meta device from its config.json, the adapter's safetensors header read)."""
    from safetensors import safe_open

    from lmforge.model.checkpoint import read_config
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(read_config(base_dir))
    modules = dict(model.named_modules())
    linear_names = sorted(
        {n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    )
    where = f"adapter {info.name} ({info.path})"
    found = 0
    try:
        with safe_open(str(Path(info.path) / WEIGHTS_FILE), "pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # a corrupt or truncated file: safetensors raises its own error types
        raise UserError(f"{where}: {WEIGHTS_FILE} cannot be read: {err}") from None
    for key, shape in sorted(shapes.items()):
        m = _LORA_KEY.match(key)
        if m is None:
            continue  # other peft tensors (DoRA magnitudes, modules_to_save): peft checks them on load
        module_name, kind = m["module"], m["kind"]
        module = modules.get(module_name)
        if not isinstance(module, torch.nn.Linear):
            raise UserError(
                f"{where}: targets {module_name}, which the served model ({base_dir}) does not have as a "
                f"Linear layer; valid target modules: {', '.join(linear_names)}"
            )
        expected = (
            [shape[0], module.in_features]
            if kind == "lora_A"
            else [module.out_features, shape[1] if shape else 0]
        )
        if len(shape) != 2 or shape != expected:
            raise UserError(
                f"{where}: {module_name}.{kind} has shape {shape}, but the served model's {module_name} is "
                f"{module.in_features}->{module.out_features} (expects {expected}); the adapter was "
                f"trained for a different base model than {base_dir}"
            )
        found += 1
    if not found:
        raise UserError(f"{where}: {WEIGHTS_FILE} holds no LoRA weights (no *.lora_A / *.lora_B tensors)")


def check_adapter(
    name: str,
    path: str | os.PathLike,
    *,
    base_dir: str | os.PathLike | None,
    base_names: set[str],
    base_label: str,
    check_base: bool = True,
) -> AdapterInfo:
    """All the checks of one adapter against the served model (see the module docstring); the shape check
    needs the base's directory (`base_dir`; None, e.g. a registry model not downloaded yet: skipped)."""
    info = read_adapter(name, path)
    if check_base:
        check_recorded_base(info, base_names, base_label)
    if base_dir is not None:
        check_fits(info, base_dir)
    return info


# ---- loading ----------------------------------------------------------------------------------------
def merge_adapter(
    model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """The base model with the adapter merged into its weights (in fp32 on the CPU, then cast and moved)."""
    from peft import PeftModel

    from lmforge.model.checkpoint import load_model_dir

    base = load_model_dir(model_dir, device="cpu", dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(device=device, dtype=dtype).eval()
    merged.rotary.reset_tables(device)
    return merged


class LoadedAdapter:
    """One adapter loaded on a replica: its merged model and engine (a `ModelRunner`), built for the
    base runner it was asked with and rebuilt when the base changes (hot swap). This object is what
    Serve's multiplexing LRU (or `LocalAdapterCache`) holds; evicting it calls `__del__` -> `close`,
    which retires the runner: its engine stops once the requests running on it are done."""

    def __init__(self, name: str, build: Callable[[Any], Any]) -> None:
        self.name = name
        self._build = build  # base ModelRunner -> adapter ModelRunner
        self._runner: Any = None
        self._base: Any = None
        self._closed = False
        self._lock = threading.Lock()

    def acquire(self, base) -> Any:
        """A runner of this adapter over `base`, acquired for one request (the caller releases it)."""
        with self._lock:
            if self._closed:  # evicted between the LRU lookup and here: serve this request, then free it
                runner = self._build(base)
                runner.acquire()
                runner.retire()
                return runner
            if self._runner is None or self._base is not base or not self._runner.acquire():
                old, self._runner, self._base = self._runner, self._build(base), base
                if old is not None:
                    old.retire()
                    log.info("adapter %s: re-merged into %s", self.name, base.info.label)
                self._runner.acquire()
            return self._runner

    @property
    def runner(self) -> Any:
        return self._runner

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.retire()
        log.info("adapter %s unloaded", self.name)

    def __del__(self) -> None:  # Serve's LRU calls this on eviction; the garbage collector later too
        self.close()


class LocalAdapterCache:
    """In-process stand-in for Serve's multiplexing: at most `max_loaded` adapters, least recently used
    evicted first (used by `ModelServer` outside Ray: tests, the in-process API)."""

    def __init__(self, load: Callable[[str], LoadedAdapter], max_loaded: int) -> None:
        self._load, self.max_loaded = load, max_loaded
        self._models: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._lock = threading.Lock()

    async def get(self, name: str) -> LoadedAdapter:
        import asyncio

        return await asyncio.to_thread(self.get_sync, name)

    def get_sync(self, name: str) -> LoadedAdapter:
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            while len(self._models) >= self.max_loaded:
                self._models.popitem(last=False)[1].close()
            self._models[name] = loaded = self._load(name)
            return loaded


AdapterSource = Callable[[str], Awaitable[LoadedAdapter]]
