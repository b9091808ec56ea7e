"""Training checkpoints: what is in one, how it is written and found, and how it becomes a model.

A checkpoint is a directory `step-NNNNNNNN/` holding everything needed to continue exactly:

    trainer_state.json        written last, by rank 0: format, step, tokens seen, strategy, world
                              size, the dataset position, the model config, the run config, the
                              MLflow run id, and a manifest of every file each rank wrote
    train_state.pt            rank 0: LR-scheduler and loss-scaler state
    rng/rank-R.pt             every rank: torch (CPU and CUDA) and Python RNG states
    model/ + optimizer.pt     ddp: a Hugging Face model directory (safetensors) + AdamW state
    trainable.safetensors     ddp, instead of model/ when part of the model is frozen (LoRA, QLoRA):
                              the trainable parameters only; the frozen rest is rebuilt from the
                              base model the run names (fine-tuning checks it is the same base)
    fsdp/                     fsdp: torch.distributed.checkpoint shards, one file per rank, of the
                              model and the optimizer state (resharded on load, so the worker
                              count may change)
    deepspeed/                deepspeed: DeepSpeed's own checkpoint; every rank writes its ZeRO
                              partition of the optimizer state

Non-weight state (`*.pt`) is loaded with `torch.load(weights_only=True)`, which refuses arbitrary
pickled objects; model weights are safetensors (or the sharded formats of FSDP / DeepSpeed, which
`consolidate()` turns into a plain model directory).

In-process, a checkpoint is staged in a hidden temp directory and renamed into place (atomic); on
Ray every rank stages its part locally and `ray.train.report` merges the parts into one directory
in the run storage. Either way `trainer_state.json` lists every file, so an interrupted copy is
recognised as incomplete and never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lmforge.errors import UserError
from lmforge.model.checkpoint import current_umask, load_model_dir, save_model_dir
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

if TYPE_CHECKING:  # pragma: no cover
    from lmforge.components.pretrain.env import RunEnv
    from lmforge.components.pretrain.strategies import TrainingStrategy

FORMAT = "lmforge-pretrain-checkpoint/1"
STATE_FILE = "trainer_state.json"
TRAIN_STATE_FILE = "train_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, or does not fit the run resuming from it."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# ---- writing ------------------------------------------------------------------------------
def save(
    stage: Path,
    *,
    env: RunEnv,
    strategy: TrainingStrategy,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data_state: dict[str, Any],
    step: int,
    tokens_seen: int,
    info: dict[str, Any],
) -> None:
    """Write this rank's part of the checkpoint into `stage` (every rank calls this, collectively).

    `info` is stored in trainer_state.json as is (config, model config, MLflow run id, metrics)."""
    strategy.save(stage)  # collective for fsdp / deepspeed
    rng_dir = stage / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(rng_state(), rng_dir / f"rank-{env.rank}.pt")
    if env.rank == 0:
        torch.save(
            {"scheduler": scheduler.state_dict(), "scaler": strategy.scaler_state()}, stage / TRAIN_STATE_FILE
        )
    files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
    manifest: list[list[str]] = [files]
    if env.distributed and env.world_size > 1:
        manifest = [[] for _ in range(env.world_size)]
        dist.all_gather_object(manifest, files)
    if env.rank == 0:
        state = {
            "format": FORMAT,
            "step": step,
            "tokens_seen": tokens_seen,
            "world_size": env.world_size,
            "strategy": strategy.name,
            "data": data_state,
            "files": {str(rank): names for rank, names in enumerate(manifest)},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **info,
        }
        tmp = stage / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
        os.replace(tmp, stage / STATE_FILE)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and staging directories left by
    an earlier process that died mid-save (called right after a publish, so none is in use)."""
    removed = [p for p in Path(root).glob(".tmp-step-*") if p.is_dir()]
    removed += list_checkpoints(root)[:-keep_last]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# ---- finding ------------------------------------------------------------------------------
def read_state(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a training checkpoint: {STATE_FILE} is missing")
    try:
        state = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format is {state.get('format')!r}, expected {FORMAT!r}")
    return state


def missing_files(path: str | os.PathLike) -> list[str]:
    """Files the manifest lists that are not there (empty = the checkpoint is complete)."""
    state = read_state(path)
    names = {name for files in state["files"].values() for name in files}
    return sorted(name for name in names if not (Path(path) / name).is_file())


def is_complete(path: str | os.PathLike) -> bool:
    try:
        return not missing_files(path)
    except CheckpointError:
        return False


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_latest(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(spec: str | None, checkpoints_dir: Path, storage: str | None = None) -> Path | None:
    """Turn `--resume` (None, "auto" or a path) into the checkpoint to start from.

    Without --resume an output directory that already holds checkpoints is refused rather than
    silently overwritten or silently continued. With `storage` (checkpoint.storage, s3://) the
    checkpoints are looked for there; "auto" downloads the newest into `checkpoints_dir` (the
    driver reads its state; Ray's workers restore it from S3 themselves)."""
    if storage:
        return _resolve_remote(spec, checkpoints_dir, storage)
    existing = find_latest(checkpoints_dir)
    if spec is None:
        if existing is not None:
            raise CheckpointError(
                f"{checkpoints_dir} already holds checkpoints (latest: {existing.name}); "
                "pass --resume auto to "
                "continue that run, or choose another output_dir"
            )
        return None
    if spec == "auto":
        return existing
    chosen = _explicit_checkpoint(spec)
    if existing is not None and existing.resolve() != chosen.resolve():
        raise CheckpointError(
            f"--resume {spec}: {checkpoints_dir} already holds checkpoints of another run "
            f"(latest: {existing.name}); "
            "resume into a fresh output_dir, or use --resume auto to continue the run that is there"
        )
    return chosen


def _explicit_checkpoint(spec: str) -> Path:
    """`--resume PATH`: a checkpoint directory, or a folder whose newest complete checkpoint is used."""
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"--resume {spec}: {path} does not exist")
    if (path / STATE_FILE).is_file():
        missing = missing_files(path)
        if missing:
            raise CheckpointError(
                f"--resume {spec}: checkpoint is incomplete, missing {', '.join(missing[:5])}"
            )
        chosen = path
    else:
        chosen = find_latest(path)
        if chosen is None:
            raise CheckpointError(
                f"--resume {spec}: {path} holds no complete checkpoint (step-NNNNNNNN/{STATE_FILE})"
            )
    return chosen


# ---- checkpoints in S3 (checkpoint.storage) ---------------------------------------------------
RUN_DIR_NAME = "checkpoints"  # Ray Train's run directory under its storage_path


def remote_run_dir(storage: str) -> tuple[str, Any]:
    """("bucket/prefix/checkpoints", pyarrow S3 filesystem): where Ray Train writes this run's
    checkpoints when `checkpoint.storage` is s3://bucket/prefix."""
    from lmforge.storage import ray_storage

    root, fs = ray_storage(storage)
    return f"{root}/{RUN_DIR_NAME}", fs


def list_remote_checkpoints(storage: str) -> list[str]:
    """Complete checkpoints under the S3 run directory (filesystem paths), oldest first: a step
    directory whose trainer_state.json lists only files that are there."""
    from pyarrow.fs import FileSelector, FileType

    root, fs = remote_run_dir(storage)
    try:
        entries = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as err:
        raise CheckpointError(f"checkpoint.storage {storage}: cannot list it ({err})") from None
    files: dict[str, set[str]] = {}
    for entry in entries:
        if entry.type != FileType.File:
            continue
        name, _, rest = entry.path[len(root) + 1 :].partition("/")
        if _NAME.match(name) and rest:
            files.setdefault(name, set()).add(rest)
    found = []
    for name, present in files.items():
        if STATE_FILE not in present:
            continue
        with fs.open_input_stream(f"{root}/{name}/{STATE_FILE}") as fh:
            try:
                state = json.loads(fh.read())
            except json.JSONDecodeError:
                continue
        listed = {n for names in state.get("files", {}).values() for n in names}
        if state.get("format") == FORMAT and listed <= present:
            found.append((int(_NAME.match(name).group(1)), f"{root}/{name}"))  # type: ignore[union-attr]
    return [path for _, path in sorted(found)]


def download_remote(storage: str, remote: str, local_root: Path) -> Path:
    """Copy one S3 checkpoint (a path from list_remote_checkpoints) to local_root/step-N (kept when
    a complete copy is already there)."""
    from pyarrow.fs import LocalFileSystem, copy_files

    _, fs = remote_run_dir(storage)
    local = Path(local_root) / Path(remote).name
    if is_complete(local):
        return local
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    copy_files(remote, str(local.resolve()), source_filesystem=fs, destination_filesystem=LocalFileSystem())
    return local


def _resolve_remote(spec: str | None, checkpoints_dir: Path, storage: str) -> Path | None:
    found = list_remote_checkpoints(storage)
    if spec == "auto":
        return download_remote(storage, found[-1], checkpoints_dir) if found else None
    if found:
        raise CheckpointError(
            f"checkpoint.storage {storage} already holds checkpoints (latest: {Path(found[-1]).name}); "
            "pass --resume auto to continue that run, or choose another checkpoint.storage"
        )
    return None if spec is None else _explicit_checkpoint(spec)


# ---- reading ------------------------------------------------------------------------------
def load(
    path: Path,
    *,
    env: RunEnv,
    strategy: TrainingStrategy,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_data,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, scaler, data position and RNG from a checkpoint
    (every rank calls this). Returns trainer_state.json."""
    state = read_state(path)
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing[:5])}")
    if state["strategy"] != strategy.name:
        raise CheckpointError(
            f"checkpoint {path} was written by strategy {state['strategy']!r}, this run uses "
            f"{strategy.name!r}; set strategy.name={state['strategy']} (or consolidate it to a model dir "
            "and use model.init_from)"
        )
    if strategy.name == "deepspeed" and state["world_size"] != env.world_size:
        raise CheckpointError(
            f"checkpoint {path} holds DeepSpeed ZeRO partitions for {state['world_size']} workers; "
            f"resume with ray.num_workers={state['world_size']} (this run has {env.world_size})"
        )
    strategy.load(path)
    extra = torch.load(path / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    strategy.load_scaler_state(extra["scaler"])
    train_data.load_state_dict(state["data"])
    rng_file = path / "rng" / f"rank-{env.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---- consolidation ----------------------------------------------------------------------------
# ---- trainable-only model state (a frozen base is not copied into every checkpoint) ---------------
def has_frozen_parameters(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def save_trainable(model: torch.nn.Module, path: Path) -> None:
    """The parameters that require a gradient, by name, as safetensors (a LoRA run on SmolLM2-135M:
    3.7 MB instead of the 545 MB model directory)."""
    from safetensors.torch import save_file

    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path), metadata={"format": "pt", "content": "lmforge trainable parameters"})
    os.chmod(
        path, 0o666 & ~current_umask()
    )  # safetensors writes 0600; the rest of a checkpoint follows the umask


def load_trainable(model: torch.nn.Module, path: Path, where: str) -> None:
    """Copy a `save_trainable` file into `model`'s trainable parameters; the names and shapes must match
    exactly (the same adapters on the same base)."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: its trainable parameters do not match the model's "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            if tensor.shape != params[name].shape:
                raise CheckpointError(
                    f"{where}: {name} is {tuple(tensor.shape)}, the model's {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


def consolidate(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint's fp32 weights as a plain (Hugging Face loadable) model directory.

    Runs in one process without a process group: ddp checkpoints already hold a model directory,
    FSDP shards are read through torch.distributed.checkpoint (which reshards to one process), and
    DeepSpeed ZeRO partitions are merged by DeepSpeed's zero_to_fp32."""
    path = Path(path)
    state = read_state(path)
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing[:5])}")
    cfg = ModelConfig.from_dict(state["model_config"])
    strategy = state["strategy"]
    if strategy == "ddp" and (path / TRAINABLE_FILE).is_file():
        raise CheckpointError(
            f"checkpoint {path} holds only the trainable parameters of a model with a frozen base "
            "(a LoRA / QLoRA fine-tuning run): export it with the fine-tuning stage (OUTPUT/adapter, "
            "`lmforge merge`), not as a whole model"
        )
    if strategy == "ddp":
        model = load_model_dir(path / "model")
    elif strategy == "fsdp":
        import torch.distributed.checkpoint as dcp

        model = _plain_model(cfg)
        # DCP loads in place into the given tensors, resharding from the saved layout.
        wanted = {"model": model.state_dict()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(wanted, checkpoint_id=str(path / "fsdp"), no_dist=True)
    elif strategy == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed")
        model = _plain_model(cfg)
        load_weights(model, weights, where=str(path))
    else:
        raise CheckpointError(f"checkpoint {path}: unknown strategy {strategy!r}")
    tokenizer = tokenizer_dir if tokenizer_dir is not None else state.get("tokenizer_dir")
    if tokenizer is not None and not (Path(tokenizer) / "tokenizer.json").is_file():
        tokenizer = None
    meta = {
        "pretrain": {
            "checkpoint": str(path),
            "step": state["step"],
            "tokens_seen": state["tokens_seen"],
            "strategy": strategy,
            "mlflow_run_id": state.get("mlflow_run_id"),
            **(extra_metadata or {}),
        }
    }
    return save_model_dir(model, out_dir, tokenizer_dir=tokenizer, extra_metadata=meta)


def _plain_model(cfg: ModelConfig) -> Transformer:
    with torch.device("cpu"):
        return Transformer(cfg)


def load_weights(model: Transformer, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load a full state dict into a plain model, allowing the tied head to be absent."""
    weights = dict(weights)
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{where}: weights do not match the model "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
