"""Parallelism strategies: turn a plain Transformer into something that trains on N workers.

`prepare(model, cfg, env)` applies, in order (as torchtitan does): activation checkpointing ->
per-block torch.compile -> the strategy (DDP, FSDP2 `fully_shard`, or DeepSpeed ZeRO 1/2/3), and
returns a `TrainingStrategy`: the wrapped model plus the few operations the training loop needs, whose
implementation differs per strategy:

    with strategy.accumulate(sync=last_micro_batch):   # skip the gradient all-reduce until the last
        with strategy.autocast():
            loss = strategy.model(inputs, targets=targets)  # fused head + loss
        strategy.backward(loss / accum_steps)           # loss scaling for fp16
    grad_norm = strategy.step()                         # unscale, clip, AdamW step, zero grads

and checkpoint I/O (`save` / `load`, each rank writing its own part). Nothing here knows about
Ray: the process group exists already (Ray Train's, or the one-process group of an in-process run).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.components.pretrain.checkpointing import (
    TRAINABLE_FILE,
    has_frozen_parameters,
    load_trainable,
    load_weights,
    save_trainable,
)
from lmforge.components.pretrain.config import PretrainConfig
from lmforge.components.pretrain.env import RunEnv
from lmforge.components.pretrain.optim import build_optimizer, param_groups
from lmforge.errors import InputNotFoundError
from lmforge.model.checkpoint import load_state_dict, save_model_dir
from lmforge.model.transformer import Transformer, apply_activation_checkpointing

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


class TrainingStrategy:
    """A model prepared for training with one strategy (see the module docstring). Not to be confused
    with `lmforge.model.engine.Engine`, the inference engine."""

    name = "base"
    model: nn.Module  # call this for the forward pass
    optimizer: torch.optim.Optimizer  # the torch AdamW (the LR scheduler drives its groups)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> torch.Tensor:
        """Apply the accumulated gradients; returns the global gradient norm before clipping."""
        raise NotImplementedError

    def loss_scale(self) -> float:
        return 1.0

    def save(self, stage: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def scaler_state(self) -> dict[str, Any]:
        return {}

    def load_scaler_state(self, state: dict[str, Any]) -> None:
        pass


# ---- DDP and FSDP: torch optimizer + GradScaler ---------------------------------------------
class _TorchStrategy(TrainingStrategy):
    def __init__(
        self,
        cfg: PretrainConfig,
        env: RunEnv,
        module: nn.Module,
        wrapped: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.cfg, self.env = cfg, env
        self.module, self.model, self.optimizer, self.scaler = module, wrapped, optimizer, scaler
        self._autocast_dtype = autocast_dtype
        self._max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf

    def autocast(self) -> contextlib.AbstractContextManager:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self._autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)  # no-op unless fp16
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self._max_norm)
        self.scaler.step(self.optimizer)  # skipped if fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor

    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def scaler_state(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_scaler_state(self, state: dict[str, Any]) -> None:
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)


class DDPStrategy(_TorchStrategy):
    """Replicated model; gradients all-reduced (skipped on accumulation micro-batches)."""

    name = "ddp"

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager:
        if sync or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def save(self, stage: Path) -> None:
        if self.env.rank == 0:  # every rank holds the same model and optimizer state
            if has_frozen_parameters(self.module):  # LoRA / QLoRA: the frozen base is not copied
                save_trainable(self.module, stage / TRAINABLE_FILE)
            else:
                save_model_dir(self.module, stage / "model")
            torch.save(self.optimizer.state_dict(), stage / "optimizer.pt")

    def load(self, path: Path) -> None:
        if (path / TRAINABLE_FILE).is_file():
            load_trainable(self.module, path / TRAINABLE_FILE, where=str(path / TRAINABLE_FILE))
        else:
            load_weights(self.module, load_state_dict(path / "model"), where=str(path / "model"))
        self.optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        )


class FSDPStrategy(_TorchStrategy):
    """Parameters, gradients and optimizer state sharded over the workers (FSDP2 `fully_shard`)."""

    name = "fsdp"

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(sync)  # accumulate unreduced grads until the last micro-batch
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _state(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(self.model, self.optimizer)

    def save(self, stage: Path) -> None:
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = self._state()
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(stage / "fsdp"))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_state, optim_state = self._state()
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path / "fsdp"))
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )


# ---- DeepSpeed ------------------------------------------------------------------------------
class DeepSpeedStrategy(TrainingStrategy):
    """DeepSpeed ZeRO: DeepSpeed's engine owns mixed precision, loss scaling, clipping and the partitioned
    optimizer state; the torch AdamW passed in does the update on each rank's partition."""

    name = "deepspeed"
    TAG = "deepspeed"

    def __init__(
        self, cfg: PretrainConfig, env: RunEnv, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        import os

        import deepspeed

        os.environ["LOCAL_RANK"] = str(env.local_rank)  # DeepSpeed insists on its launcher's variable
        self.cfg, self.env, self.module = cfg, env, module
        self.optimizer = optimizer
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing process group
        self.ds, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=deepspeed_config(cfg)
        )
        self.model = self.ds

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        self.ds.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the loop already divided by the accumulation steps

    def step(self) -> torch.Tensor:
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def loss_scale(self) -> float:
        return (
            float(getattr(self.ds.optimizer, "loss_scale", 1.0))
            if self.cfg.precision.dtype == "fp16"
            else 1.0
        )

    def save(self, stage: Path) -> None:
        self.ds.save_checkpoint(str(stage), tag=self.TAG, save_latest=False)

    def load(self, path: Path) -> None:
        loaded, _ = self.ds.load_checkpoint(
            str(path), tag=self.TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise InputNotFoundError(f"DeepSpeed found no checkpoint under {path / self.TAG}")


def deepspeed_config(cfg: PretrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config implied by the lmforge config (batch sizes must agree exactly)."""
    dtype = cfg.precision.dtype
    return {
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.strategy.zero_stage},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {
            "enabled": dtype == "fp16",
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": int(round(math.log2(cfg.precision.initial_scale))),
            "loss_scale_window": cfg.precision.growth_interval,
            "min_loss_scale": 1,
        },
        "zero_allow_untested_optimizer": True,  # a plain torch.optim.AdamW
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# ---- prepare --------------------------------------------------------------------------------
def prepare(model: Transformer, cfg: PretrainConfig, env: RunEnv) -> TrainingStrategy:
    """Apply the configured transforms and strategy to `model` (on CPU, identical on every rank)."""
    if cfg.strategy.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.strategy.release_memory_every and env.device.type == "cpu":
        from lmforge.memory import release_memory_between_blocks

        if not release_memory_between_blocks(model.model.layers, cfg.strategy.release_memory_every):
            warnings.warn(
                "strategy.release_memory_every: this C library has no malloc_trim; ignored", stacklevel=1
            )
    if cfg.strategy.compile:
        for block in model.model.layers:
            block.compile()  # in place: parameter names (and so checkpoints) are unchanged
    n_layers = model.config.n_layers
    half = HALF.get(cfg.precision.dtype)
    fp16 = cfg.precision.dtype == "fp16"
    name = cfg.strategy.name

    if name == "deepspeed":
        model.to(env.device)
        optimizer = build_optimizer(param_groups(model, n_layers, cfg.optim), cfg.optim)
        return DeepSpeedStrategy(cfg, env, model, optimizer)

    if name == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model.to(env.device)
        policy = (
            MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
            if half
            else MixedPrecisionPolicy()
        )
        for block in model.model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        optimizer = build_optimizer(param_groups(model, n_layers, cfg.optim), cfg.optim)
        if fp16:  # overflow checks must agree across shards
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(
                env.device.type,
                init_scale=cfg.precision.initial_scale,
                growth_interval=cfg.precision.growth_interval,
            )
        else:
            scaler = torch.amp.GradScaler(env.device.type, enabled=False)
        # FSDP casts the gathered parameters itself (the policy), so no autocast on top.
        return FSDPStrategy(cfg, env, model, model, optimizer, scaler, autocast_dtype=None)

    model.to(env.device)
    wrapped: nn.Module = model
    if env.distributed and env.world_size > 1:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # No per-forward buffer sync: the only buffers are the RoPE tables, identical by construction
        # (torch >= 2.13 spells it forward_sync_buffers, older versions broadcast_buffers).
        ddp_args = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in ddp_args
            else {"broadcast_buffers": False}
        )
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, gradient_as_bucket_view=True, **no_sync
        )
    # fused AdamW: one kernel for all parameters (on CPU ~3.5x faster than the per-tensor loop)
    optimizer = build_optimizer(
        param_groups(model, n_layers, cfg.optim), cfg.optim, fused=env.device.type in FUSED_ADAMW_DEVICES
    )
    scaler = torch.amp.GradScaler(
        env.device.type,
        init_scale=cfg.precision.initial_scale,
        growth_interval=cfg.precision.growth_interval,
        enabled=fp16,
    )
    return DDPStrategy(cfg, env, model, wrapped, optimizer, scaler, autocast_dtype=half)
