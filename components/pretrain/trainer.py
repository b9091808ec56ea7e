"""Ray Train wiring: run `loop.train` on N workers with a `TorchTrainer`.

    ScalingConfig(num_workers, use_gpu, resources_per_worker)   one process per worker, gloo on
                                                                CPUs, nccl on GPUs
    RunConfig(storage_path=<output_dir>, name="checkpoints")    checkpoints land in
                                                                <output_dir>/checkpoints/step-N,
                                                                or s3://BUCKET/PREFIX/checkpoints/step-N
                                                                with checkpoint.storage (MinIO / S3)
    FailureConfig(max_failures)                                 a dead worker restarts the group,
                                                                which resumes from the newest checkpoint
    CheckpointConfig(num_to_keep=checkpoint.keep_last)

Ray Train remembers the checkpoints of a run directory (its snapshot), so `--resume auto` just
reuses the directory; `ray.train.get_checkpoint()` inside the workers then returns the newest one,
as it does after a failure. An explicit `--resume PATH` into a fresh directory is passed to the
workers and used only while Ray has no checkpoint of its own.

Preemption: SIGTERM (or a first Ctrl-C) to the driver sets a flag in a small actor; rank 0 polls it
on log steps and the workers agree (one all-reduce), checkpoint, and return. `ray.train.report` is
called only with checkpoints (each call is a barrier that costs up to
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); metrics go to MLflow directly from rank 0.

Output: Ray's own logs and everything the workers print go to <output_dir>/logs/pretrain-*.log
(`lmforge.ray_logs`); the console shows rank 0's `[pretrain]` lines, once each.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from lmforge.components.pretrain import checkpointing
from lmforge.components.pretrain.config import PretrainConfig
from lmforge.components.pretrain.env import RunEnv, graceful_stop
from lmforge.components.pretrain.loop import OnStep, train
from lmforge.components.pretrain.task import TrainTask
from lmforge.components.pretrain.tracking import open_tracker
from lmforge.model.config import ModelConfig
from lmforge.ray_logs import RayLogs, default_log_file

RAY_RUN_NAME = checkpointing.RUN_DIR_NAME  # Ray's run directory = <output_dir>/checkpoints
CONSOLE_PREFIX = "[pretrain] "  # rank 0's progress and notices: the worker lines a user sees
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# Forwarded to the workers when set in the driver (they may have been started before it was set).
FORWARDED_ENV = ("TORCH_EXTENSIONS_DIR", "MLFLOW_S3_ENDPOINT_URL", "DS_ACCELERATOR")


@ray.remote(num_cpus=0)
class StopFlag:
    """Set by the driver on SIGTERM; polled by rank 0."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def get(self) -> bool:
        return self.value


class RayEnv(RunEnv):
    """A Ray Train worker: rank and device from the Train context, checkpoints through report()."""

    def __init__(self, cfg: PretrainConfig, resume_from: str | None, stop_flag: Any) -> None:
        super().__init__(cfg.checkpoints_dir(), cfg.checkpoint.keep_last, resume_from)
        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = (
            ctx.get_world_rank(),
            ctx.get_world_size(),
            ctx.get_local_rank(),
        )
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._stop_flag = stop_flag

    def start_checkpoint(self) -> Path | None:
        """Ray's newest checkpoint of this run (after a restart), else the --resume checkpoint."""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return self.resume_from
        import pyarrow.fs

        if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
            return Path(ckpt.path)
        return Path(ckpt.to_directory())  # remote storage (S3): download once

    def stop_requested(self, log_step: bool) -> bool:
        if not log_step:
            return False
        flag = self.rank == 0 and bool(ray.get(self._stop_flag.get.remote(), timeout=60))
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def staging_dir(self, step: int) -> Path:
        return Path(
            tempfile.mkdtemp(prefix=f"lmforge-{checkpointing.checkpoint_name(step)}-rank{self.rank}-")
        )

    def publish_checkpoint(self, staged: Path, step: int, metrics: dict[str, Any]) -> None:
        """Every rank reports its staged part; Ray merges them into <run dir>/step-N."""
        try:
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(str(staged)),
                checkpoint_dir_name=checkpointing.checkpoint_name(step),
            )
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return None


def _worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    for key, value in config["env"].items():
        os.environ.setdefault(key, value)
    cfg: PretrainConfig = config["cfg"]
    env = RayEnv(cfg, config["resume_from"], config["stop_flag"])
    tracking = config["tracking"]
    tracker = open_tracker(env.rank == 0 and cfg.tracking.enabled, tracking["uri"], tracking["run_id"])
    train(
        cfg,
        config["model_cfg"],
        env,
        tracker,
        info=config["info"],
        on_step=config["on_step"],
        task=config.get("task"),
    )


def _fit(trainer: TorchTrainer, stop_flag: Any) -> ray.train.Result:
    """trainer.fit() in a helper thread, so that the main thread stays free to handle SIGTERM /
    Ctrl-C at once (a main thread blocked inside Ray notices signals only about once a second)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name="lmforge-ray-fit", daemon=True)
    with graceful_stop(lambda: stop_flag.set.remote()):
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _ensure_ray(cfg: PretrainConfig, logs: RayLogs | None) -> bool:
    """Connect to $RAY_ADDRESS / ray.address, or start a local Ray. True if we started it; then
    Ray's and the workers' output go through `logs` (a log file; the console shows only lines
    starting with CONSOLE_PREFIX, unless verbose)."""
    if ray.is_initialized():
        return False
    repo = str(Path(__file__).resolve().parents[2])  # so workers import model/ and components/
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address=cfg.ray.address,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={
            "env_vars": {
                "PYTHONPATH": pythonpath,
                # Ray Train otherwise copies every print() of a worker into its logger too: each
                # progress line would reach the driver twice (stdout and stderr)
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            }
        },
    )
    if logs is not None:
        logs.ray_started()
    return True


def run_on_ray(
    cfg: PretrainConfig,
    model_cfg: ModelConfig,
    *,
    resume_from: Path | None,
    info: dict[str, Any],
    tracking: dict[str, str | None],
    on_step: OnStep | None = None,
    verbose: bool = True,
    task: TrainTask | None = None,
) -> tuple[Path | None, dict[str, Any]]:
    """Train on Ray; returns (newest checkpoint path, rank 0's last reported metrics).

    When this call starts Ray, Ray's and the workers' logs go to <output_dir>/logs/pretrain-*.log;
    the console gets rank 0's `[pretrain]` lines only, or everything as well when `verbose`."""
    logs = None
    if not ray.is_initialized():
        log_file = default_log_file("pretrain", Path(cfg.output_dir) / "logs")
        logs = RayLogs(log_file, verbose=verbose, show=lambda line: line.startswith(CONSOLE_PREFIX))
        note = "" if verbose else " (--verbose also prints them here)"
        print(f"{CONSOLE_PREFIX}Ray's and the workers' logs: {log_file}{note}", flush=True)
    with logs or contextlib.nullcontext():
        return _run_on_ray(cfg, model_cfg, resume_from, info, tracking, on_step, logs, task)


def _run_on_ray(
    cfg: PretrainConfig,
    model_cfg: ModelConfig,
    resume_from: Path | None,
    info: dict[str, Any],
    tracking: dict[str, str | None],
    on_step: OnStep | None,
    logs: RayLogs | None,
    task: TrainTask | None = None,
) -> tuple[Path | None, dict[str, Any]]:
    started = _ensure_ray(cfg, logs)
    try:
        storage_path, storage_fs = _storage(cfg)
        stop_flag = StopFlag.remote()
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "cfg": cfg,
                "model_cfg": model_cfg,
                "resume_from": str(resume_from) if resume_from else None,
                "info": info,
                "tracking": tracking,
                "stop_flag": stop_flag,
                "on_step": on_step,
                "task": task,
                "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.ray.num_workers,
                use_gpu=cfg.ray.use_gpu,
                resources_per_worker=cfg.ray.resources_per_worker or None,
            ),
            torch_config=TorchConfig(backend=cfg.strategy.backend or ("nccl" if cfg.ray.use_gpu else "gloo")),
            run_config=RunConfig(
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                name=RAY_RUN_NAME,
                failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            ),
        )
        result = _fit(trainer, stop_flag)
        checkpoint = None
        if result.checkpoint is not None and storage_fs is not None:  # S3: fetch it for consolidation
            checkpoint = checkpointing.download_remote(
                cfg.checkpoint.storage or "", result.checkpoint.path, cfg.checkpoints_dir()
            )
        elif result.checkpoint is not None:
            checkpoint = Path(result.checkpoint.path)
            if not checkpoint.exists():  # storage this machine does not see: fetch it for consolidation
                checkpoint = Path(result.checkpoint.to_directory())
        return checkpoint, dict(result.metrics or {})
    finally:
        if started:
            ray.shutdown()


def _storage(cfg: PretrainConfig) -> tuple[str, Any]:
    """Ray Train's (storage_path, storage_filesystem): <output_dir> locally, or checkpoint.storage on
    S3 (pyarrow's S3 filesystem at $LMFORGE_S3_ENDPOINT; the credentials travel inside it, never in
    a log line). Ray restores a run directory's checkpoints from its snapshot file: one left by an
    attempt that never completed a checkpoint is removed first, so the start is fresh (or the
    explicit --resume PATH)."""
    if not cfg.checkpoint.storage:
        run_dir = cfg.checkpoints_dir()
        if checkpointing.find_latest(run_dir) is None:
            (run_dir / SNAPSHOT_FILE).unlink(missing_ok=True)
        return str(Path(cfg.output_dir).resolve()), None
    from pyarrow.fs import FileType

    root, fs = checkpointing.remote_run_dir(cfg.checkpoint.storage)
    snapshot = f"{root}/{SNAPSHOT_FILE}"
    if not checkpointing.list_remote_checkpoints(cfg.checkpoint.storage):
        if fs.get_file_info(snapshot).type == FileType.File:
            fs.delete_file(snapshot)
    bucket = root.split("/", 1)[0]
    if fs.get_file_info(bucket).type == FileType.NotFound:  # Ray does not create buckets
        fs.create_dir(bucket, recursive=False)
    return root.rsplit("/", 1)[0], fs
