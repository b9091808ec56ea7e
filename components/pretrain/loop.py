"""The pretraining loop: one function, read top to bottom.

    data -> model -> strategy + optimizer + schedule -> resume? -> while step < max_steps:
        accumulate micro-batches -> optimizer step -> log -> evaluate -> stop request? -> checkpoint

It runs unchanged in this process (`ray.num_workers: 0`, the tests, `make demo`) and on every Ray
Train worker; `env` (see env.py / trainer.py) supplies what differs: rank, device, stop requests,
and where checkpoints go. Batches: every optimizer step consumes `data.global_batch_size`
sequences; rank r reads its round-robin share of the same global order (token_dataset.py), so the
set of sequences in step s does not depend on the number of workers, and a run resumes exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lmforge.components.pretrain import checkpointing, strategies
from lmforge.components.pretrain.config import PretrainConfig
from lmforge.components.pretrain.env import RunEnv
from lmforge.components.pretrain.optim import build_scheduler
from lmforge.components.pretrain.task import PRETRAIN, BatchSource, TrainTask
from lmforge.components.pretrain.tracking import ConsoleProgress, Tracker
from lmforge.model.config import ModelConfig

# Peak dense bf16 FLOP/s per device (../shared/docs/anchors.md), matched against the CUDA device name.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
IGNORE_INDEX = -100  # a target the model does not score (Transformer.forward's `targets`)

OnStep = Callable[
    [int, int], None
]  # (step just completed, rank): an observer, e.g. to inject faults in tests


@dataclass
class LoopResult:
    step: int  # optimizer steps completed
    tokens_seen: int
    preempted: bool  # stopped early on a stop request (after checkpointing)
    metrics: dict[str, float]  # the last logged values of every metric
    history: list[dict[str, float]] = field(default_factory=list)  # every logged record (rank 0), with "step"
    checkpoint: str | None = None  # the last published checkpoint (in-process runs)


def train(
    cfg: PretrainConfig,
    model_cfg: ModelConfig,
    env: RunEnv,
    tracker: Tracker,
    *,
    info: dict[str, Any] | None = None,
    on_step: OnStep | None = None,
    task: TrainTask | None = None,
) -> LoopResult:
    """Train `model_cfg` on `cfg.data` until `cfg.schedule.max_steps` (or a stop request).

    `task` (task.py) says what is trained: model, data and loss; pretraining when None."""
    task = task or PRETRAIN
    # ---- data: this rank's share of the training stream, and of the validation split
    train_data = task.train_data(cfg, env)
    val_data = task.val_data(cfg, env) if cfg.eval.every else None

    # ---- model: identical initial weights on every rank (same seed, built on CPU)
    torch.manual_seed(cfg.seed)
    mem_before_model = _resident_memory_gb(env)  # the process (imports, data) before any weight exists
    model = task.build_model(cfg, model_cfg)

    # ---- strategy (DDP / FSDP / DeepSpeed + activation checkpointing + compile), AdamW, schedule
    if cfg.strategy.name != "ddp":
        env.ensure_process_group(cfg.strategy.backend or ("nccl" if env.device.type == "cuda" else "gloo"))
    strategy = strategies.prepare(model, cfg, env)
    scheduler = build_scheduler(strategy.optimizer, cfg.schedule)

    # ---- resume: model, optimizer, schedule, scaler, data position and RNG, exactly
    step, tokens_seen = 0, 0
    start = env.start_checkpoint()
    if start is not None:
        state = checkpointing.load(
            start, env=env, strategy=strategy, scheduler=scheduler, train_data=train_data
        )
        step, tokens_seen = state["step"], state["tokens_seen"]
        if env.rank == 0:
            print(f"[pretrain] resumed from {start} at step {step}", flush=True)

    # ---- train
    accum = cfg.grad_accum_steps
    micro = cfg.data.micro_batch_size
    max_steps = cfg.schedule.max_steps
    flops_per_token = model_cfg.flops_per_token(cfg.data.seq_len)
    peak_flops = _peak_flops(cfg, env)
    progress = ConsoleProgress(max_steps, step) if env.rank == 0 else None
    history: list[dict[str, float]] = []
    latest: dict[str, float] = {}
    preempted, published = False, start  # `published`: the newest checkpoint of this run
    loss_sum = torch.zeros((), device=env.device)  # sum of step losses since the last log (no host sync)
    grad_norm = torch.zeros(())
    window_steps, window_start, paused = 0, time.perf_counter(), 0.0
    strategy.model.train()

    while step < max_steps:
        # one optimizer step: this rank's share of the global batch, in micro-batches
        for i in range(accum):
            # (inputs, targets, ...): (micro, T) each
            batch = tuple(t.to(env.device, non_blocking=True) for t in train_data.next_batch(micro))
            with strategy.accumulate(sync=i == accum - 1):  # all-reduce gradients on the last one only
                with strategy.autocast():
                    # pretraining: the model's fused head + cross-entropy (no logits tensor)
                    loss = task.loss(strategy.model, batch)
                strategy.backward(loss / accum)
            loss_sum += loss.detach() / accum
        grad_norm = strategy.step()
        scheduler.step()
        step += 1
        tokens_seen += cfg.tokens_per_step
        window_steps += 1

        # log: mean loss over the window and all ranks, throughput, MFU, memory
        record: dict[str, float] = {}
        log_step = step % cfg.tracking.log_every == 0 or step == max_steps
        if log_step:
            seconds = max(time.perf_counter() - window_start - paused, 1e-9)
            mean_loss = _mean_over_ranks(loss_sum / window_steps, env)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"training loss is {mean_loss} at step {step}; lower optim.lr or use bf16/fp32"
                )
            tokens_per_s = window_steps * cfg.tokens_per_step / seconds
            record = {
                "train/loss": mean_loss,
                "train/lr": max(
                    scheduler.get_last_lr()
                ),  # the full-rate groups (layer-wise decay scales the rest down)
                "train/grad_norm": float(grad_norm),
                "train/loss_scale": strategy.loss_scale(),
                "train/tokens_per_s": tokens_per_s,
                "train/tokens_seen": float(tokens_seen),
                "train/peak_mem_gb": _peak_memory_gb(env),
                # training memory: peak minus the process before the model was built (on CUDA the
                # allocated peak, which holds no runtime anyway)
                "train/peak_train_mem_gb": _peak_memory_gb(env) - mem_before_model,
            }
            if peak_flops:
                record["train/mfu"] = flops_per_token * tokens_per_s / (peak_flops * env.world_size)
            loss_sum.zero_()
            window_steps, window_start, paused = 0, time.perf_counter(), 0.0

        # evaluate: validation loss and perplexity
        if val_data is not None and (step % cfg.eval.every == 0 or step == max_steps):
            t = time.perf_counter()
            record.update(evaluate(strategy, val_data, cfg.eval.batches, micro, env, task))
            paused += time.perf_counter() - t

        if record and env.rank == 0:
            tracker.log_metrics(record, step)
            progress.update(step, record)
            history.append({"step": float(step), **record})
        latest.update(record)
        if on_step is not None:
            on_step(step, env.rank)

        # stop request (SIGTERM / preemption): checkpoint now, then return
        stop = env.stop_requested(log_step)

        # checkpoint: every N steps, at the end, and before stopping
        if step % cfg.checkpoint.every == 0 or step == max_steps or stop:
            t = time.perf_counter()
            stage = env.staging_dir(step)
            checkpointing.save(
                stage,
                env=env,
                strategy=strategy,
                scheduler=scheduler,
                data_state=train_data.state_dict(),
                step=step,
                tokens_seen=tokens_seen,
                info={**(info or {}), "model_config": model_cfg.to_dict(), "metrics": latest},
            )
            report = {
                "step": step,
                "tokens_seen": tokens_seen,
                "preempted": float(stop and step < max_steps),
                **latest,
            }
            published = env.publish_checkpoint(stage, step, report)
            paused += time.perf_counter() - t
        if stop:
            preempted = step < max_steps
            if env.rank == 0:
                print(f"[pretrain] stop requested: checkpointed step {step} and stopping", flush=True)
            break

    return LoopResult(
        step=step,
        tokens_seen=tokens_seen,
        preempted=preempted,
        metrics=latest,
        history=history,
        checkpoint=str(published) if published else None,
    )


# ---- helpers --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    strategy: strategies.TrainingStrategy,
    data: BatchSource,
    max_batches: int,
    batch_size: int,
    env: RunEnv,
    task: TrainTask = PRETRAIN,
) -> dict[str, float]:
    """Mean next-token loss over (up to) `max_batches` batches of every rank's validation share.

    The model returns the mean over the scored targets (IGNORE_INDEX excluded); weighting each batch
    by its number of scored targets makes the result the mean over all of them, whatever the batches."""
    strategy.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)  # (sum of token losses, tokens)
    for cpu_batch in data.iter_eval_batches(batch_size, max_batches=max_batches):
        batch = tuple(t.to(env.device) for t in cpu_batch)
        scored = (batch[1] != IGNORE_INDEX).sum().double()
        with strategy.autocast():
            batch_mean = task.loss(strategy.model, batch).double()
        # mean -> sum; a batch with nothing scored (0/0 = nan) adds nothing. No skipping it on the host:
        # that would sync every batch, and sharded strategies need every rank in every forward pass.
        total += torch.stack([torch.where(scored > 0, batch_mean * scored, 0.0), scored])
    if env.distributed and env.world_size > 1:
        dist.all_reduce(total)
    strategy.model.train()
    mean = (total[0] / total[1].clamp(min=1)).item()
    return {"val/loss": mean, "val/ppl": math.exp(min(mean, 700.0))}


def _mean_over_ranks(value: torch.Tensor, env: RunEnv) -> float:
    if env.distributed and env.world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return float(value.item())


def _peak_flops(cfg: PretrainConfig, env: RunEnv) -> float | None:
    """Peak dense bf16 FLOP/s of one device: configured, or known from the GPU's name."""
    if cfg.tracking.peak_tflops:
        return cfg.tracking.peak_tflops * 1e12
    if env.device.type == "cuda":
        name = torch.cuda.get_device_name(env.device)
        for key, tflops in PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12
    return None


def _resident_memory_gb(env: RunEnv) -> float:
    """GPU memory allocated by torch now, or the process's resident memory now on CPU (Linux; else 0)."""
    if env.device.type == "cuda":
        return torch.cuda.memory_allocated(env.device) / 1e9
    from lmforge.memory import resident_gb

    return resident_gb()


def _peak_memory_gb(env: RunEnv) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if env.device.type == "cuda":
        return torch.cuda.max_memory_allocated(env.device) / 1e9
    from lmforge.memory import peak_resident_gb

    return peak_resident_gb()  # this program's own peak (not a parent's: see lmforge/memory.py)
