"""The pretraining stage function: `pretrain(config) -> PretrainResult`.

One code path for the CLI (`lmforge pretrain`), `lmforge run` and the tests:
  1. preflight, before any Ray or process group exists: paths made absolute, the token shards
     read, the model config resolved (vocabulary from the data), resume target chosen;
  2. an MLflow run opened (or the resumed run reopened): params, the config file;
  3. training: in this process (`ray.num_workers: 0`) or on Ray Train workers (trainer.py);
  4. the newest checkpoint consolidated into `<output_dir>/model` (a Hugging Face loadable model
     directory with the tokenizer), a loss-curve PNG, both logged to MLflow.
A run stopped by SIGTERM ends after step 3 with `preempted=True`; `--resume auto` continues it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.components.pretrain import checkpointing
from lmforge.components.pretrain.config import PretrainConfig, describe
from lmforge.components.pretrain.env import RunEnv
from lmforge.components.pretrain.loop import OnStep, train
from lmforge.components.pretrain.task import TrainTask
from lmforge.components.pretrain.tracking import (
    flatten,
    plot_loss_curve,
    start_run_tracker,
)
from lmforge.components.token_dataset import PackedTokenDataset, read_index
from lmforge.config import to_dict
from lmforge.model.config import ConfigError, ModelConfig


@dataclass
class PretrainResult:
    output_dir: Path
    model_dir: Path | None  # the final model; None when the run stopped early (preempted)
    checkpoint_dir: Path | None  # the newest checkpoint (resume from it with --resume auto|PATH)
    metrics: dict[str, float]  # last logged value of each metric (train/*, val/*)
    step: int
    preempted: bool
    mlflow_run_id: str | None
    loss_curve: Path | None


def pretrain(
    cfg: PretrainConfig,
    *,
    resume: str | None = None,
    on_step: OnStep | None = None,
    verbose: bool = True,
    task: TrainTask | None = None,
) -> PretrainResult:
    """Train a model as configured. `resume`: None (fresh; refuses an output_dir that holds
    checkpoints), "auto" (continue from the newest checkpoint there, if any) or a checkpoint path.
    `on_step(step, rank)` is called on every worker after each optimizer step (tests use it to
    inject failures). On Ray, Ray's and the workers' logs go to <output_dir>/logs/; `verbose`
    prints them on the console as well (otherwise only the `[pretrain]` lines appear). `task` (task.py):
    what is trained (distillation, pruning recovery); pretraining when None."""
    cfg = absolute_paths(cfg)
    model_cfg, tokenizer_dir = preflight(cfg)
    start = checkpointing.resolve_resume(resume, cfg.checkpoints_dir(), cfg.checkpoint.storage)
    previous = checkpointing.read_state(start) if start is not None else {}

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = to_dict(cfg)
    config_file = out / "config.yaml"
    config_file.write_text(yaml.safe_dump(config_dict, sort_keys=False))

    tracker = start_run_tracker(cfg.tracking, cfg.resolved_run_name, previous)
    info = {
        "config": config_dict,
        "model_config": model_cfg.to_dict(),
        "tokenizer_dir": tokenizer_dir,
        "mlflow_run_id": tracker.run_id,
        "mlflow_tracking_uri": tracker.tracking_uri,
    }
    status = "FAILED"
    try:
        tracker.log_params(
            {
                **flatten(config_dict),
                "model.num_params": model_cfg.num_params(),
                "derived.world_size": cfg.world_size,
                "derived.grad_accum_steps": cfg.grad_accum_steps,
                "derived.tokens_per_step": cfg.tokens_per_step,
                **flatten(model_cfg.to_dict(), "model_config."),
            }
        )
        tracker.log_artifact(config_file)
        print(
            f"[pretrain] {describe(cfg)}; model {model_cfg.num_params() / 1e6:.2f}M params"
            + (f"; resuming from {start}" if start else ""),
            flush=True,
        )

        history: list[dict[str, float]] = []
        if cfg.local:
            env = RunEnv(cfg.checkpoints_dir(), cfg.checkpoint.keep_last, start, use_gpu=cfg.ray.use_gpu)
            with env.stop_on_signals():
                result = train(cfg, model_cfg, env, tracker, info=info, on_step=on_step, task=task)
            checkpoint = Path(result.checkpoint) if result.checkpoint else None
            metrics, preempted, step, history = result.metrics, result.preempted, result.step, result.history
        else:
            from lmforge.components.pretrain.trainer import run_on_ray

            checkpoint, reported = run_on_ray(
                cfg,
                model_cfg,
                resume_from=start,
                info=info,
                on_step=on_step,
                tracking={"uri": tracker.tracking_uri, "run_id": tracker.run_id},
                verbose=verbose,
                task=task,
            )
            metrics = {k: float(v) for k, v in reported.items() if "/" in k}
            preempted, step = bool(reported.get("preempted")), int(reported.get("step", 0))

        model_dir = None
        if not preempted and checkpoint is not None:
            model_dir = checkpointing.consolidate(
                checkpoint,
                cfg.model_dir(),
                tokenizer_dir,
                extra_metadata={"config": config_dict, "metrics": metrics},
            )
            print(f"[pretrain] model written to {model_dir}", flush=True)
        elif preempted:
            print(
                f"[pretrain] stopped at step {step}; continue with --resume auto (checkpoint {checkpoint})",
                flush=True,
            )

        train_curve = tracker.metric_history("train/loss") or _series(history, "train/loss")
        val_curve = tracker.metric_history("val/loss") or _series(history, "val/loss")
        curve = plot_loss_curve(train_curve, val_curve, out / "loss_curve.png", cfg.resolved_run_name)
        if curve is not None:
            tracker.log_artifact(curve)
        if model_dir is not None and cfg.tracking.log_model:
            tracker.log_artifacts(model_dir, "model")
        status = "KILLED" if preempted else "FINISHED"
        return PretrainResult(
            output_dir=out,
            model_dir=model_dir,
            checkpoint_dir=checkpoint,
            metrics=metrics,
            step=step,
            preempted=preempted,
            mlflow_run_id=tracker.run_id,
            loss_curve=curve,
        )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def _series(history: list[dict[str, float]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), r[key]) for r in history if key in r]


# ---- preflight ------------------------------------------------------------------------------
def absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """Every path absolute: Ray workers run in other directories (and on other machines)."""

    def absolute(p: str | None) -> str | None:
        return str(Path(p).expanduser().resolve()) if p else p

    return dataclasses.replace(
        cfg,
        output_dir=absolute(cfg.output_dir),
        data=dataclasses.replace(
            cfg.data, shards_dir=absolute(cfg.data.shards_dir), tokenizer_dir=absolute(cfg.data.tokenizer_dir)
        ),
        model=dataclasses.replace(cfg.model, init_from=absolute(cfg.model.init_from)),
    )


def preflight(cfg: PretrainConfig) -> tuple[ModelConfig, str | None]:
    """Check everything that needs the filesystem, before Ray starts. Returns the model config
    (vocabulary from the data unless overridden) and the tokenizer directory to ship."""
    shards = cfg.data.shards_dir
    try:
        index = read_index(shards)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.shards_dir: {err}") from None
    splits = sorted(index["splits"])
    if "train" not in index["splits"]:
        raise ConfigError(f"data.shards_dir: {shards} has no 'train' split (found: {', '.join(splits)})")
    if cfg.eval.every and cfg.eval.split not in index["splits"]:
        raise ConfigError(
            f"eval.split={cfg.eval.split!r}: {shards} has no such split (found: {', '.join(splits)}); "
            "set eval.every=0 to train without validation"
        )
    try:
        model_cfg = cfg.model.build(int(index["vocab_size"]), int(index["eos_id"]))
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError) and not cfg.model.init_from:
            raise
        raise ConfigError(f"model.init_from: {err}") from None
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's context "
            f"(max_seq_len={model_cfg.max_seq_len})"
        )
    for split in ["train"] + ([cfg.eval.split] if cfg.eval.every else []):
        try:  # enough tokens for one sequence per worker (opens memmaps only)
            PackedTokenDataset(shards, split, cfg.data.seq_len, world_size=cfg.world_size)
        except ValueError as err:
            raise ConfigError(f"data.shards_dir: {err}") from None
    tokenizer_dir = cfg.data.tokenizer_dir
    if tokenizer_dir is not None:
        if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            raise ConfigError(f"data.tokenizer_dir: {tokenizer_dir} has no tokenizer.json")
    elif index.get("tokenizer_dir") and (Path(index["tokenizer_dir"]) / "tokenizer.json").is_file():
        tokenizer_dir = str(Path(index["tokenizer_dir"]).resolve())
    if cfg.strategy.name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "strategy.name=deepspeed needs the deepspeed package: pip install 'lmforge[deepspeed]'"
        )
    if cfg.local and cfg.ray.use_gpu and not torch.cuda.is_available():
        raise ConfigError("ray.use_gpu=true but this process sees no CUDA device")
    return model_cfg, tokenizer_dir


def result_summary(result: PretrainResult) -> dict[str, Any]:
    """JSON-friendly summary (the CLI prints it)."""
    return {
        "output_dir": str(result.output_dir),
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "checkpoint_dir": str(result.checkpoint_dir) if result.checkpoint_dir else None,
        "step": result.step,
        "preempted": result.preempted,
        "mlflow_run_id": result.mlflow_run_id,
        **result.metrics,
    }
