"""What a training run trains: the one seam between the loop and pretraining, fine-tuning, distillation.

The loop (loop.py) owns everything the three share: strategies (DDP / FSDP / DeepSpeed), gradient
accumulation, the schedule, logging, validation, checkpoints, exact resume and preemption. A
`TrainTask` supplies only what differs:

    build_model(cfg, model_cfg)  -> nn.Module      pretraining: a fresh Transformer (or init_from);
                                                   fine-tuning: the base wrapped by peft (frozen base)
    train_data(cfg, env)         -> BatchSource    this rank's share of the training stream
    val_data(cfg, env)           -> BatchSource    the validation share (or None: no validation)
    loss(model, batch)           -> scalar Tensor  pretraining: model(inputs, targets=targets)
                                                   distillation: KL to the teacher + hard labels

A batch is a tuple of tensors whose first two are (inputs, targets) of shape (B, T); targets hold
IGNORE_INDEX (-100) where nothing is scored. The loop moves every tensor of the batch to the device.
Only parameters with `requires_grad` reach the optimizer, so a frozen base costs no optimizer state.

A task must be picklable (it travels to the Ray Train workers): a dataclass of module-level
functions, or an instance of a module-level class.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from lmforge.components.pretrain.config import PretrainConfig
    from lmforge.components.pretrain.env import RunEnv
    from lmforge.model.config import ModelConfig

Batch = tuple[torch.Tensor, ...]


class BatchSource(Protocol):
    """A rank's stream of batches, resumable exactly (PackedTokenDataset is one)."""

    def next_batch(self, batch_size: int) -> Batch: ...

    def iter_eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainTask:
    """Pretraining: the model config's Transformer on packed token shards, next-token loss.

    Subclass and override what differs (finetune/, distill/)."""

    name = "pretrain"

    def build_model(self, cfg: PretrainConfig, model_cfg: ModelConfig) -> nn.Module:
        from lmforge.model.checkpoint import load_model_dir
        from lmforge.model.transformer import Transformer

        if cfg.model.init_from:
            return load_model_dir(cfg.model.init_from, device="cpu", dtype=torch.float32).train()
        return Transformer(model_cfg)

    def train_data(self, cfg: PretrainConfig, env: RunEnv) -> BatchSource:
        from lmforge.components.token_dataset import PackedTokenDataset

        return PackedTokenDataset(
            cfg.data.shards_dir,
            "train",
            cfg.data.seq_len,
            seed=cfg.seed,
            rank=env.rank,
            world_size=env.world_size,
            shuffle=cfg.data.shuffle,
        )

    def val_data(self, cfg: PretrainConfig, env: RunEnv) -> BatchSource | None:
        from lmforge.components.token_dataset import PackedTokenDataset

        if not cfg.eval.every:
            return None
        return PackedTokenDataset(
            cfg.data.shards_dir,
            cfg.eval.split,
            cfg.data.seq_len,
            rank=env.rank,
            world_size=env.world_size,
            shuffle=False,
        )

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean next-token loss over the scored targets (the model's fused head + cross-entropy)."""
        inputs, targets = batch[0], batch[1]
        return model(inputs, targets=targets)


PRETRAIN = TrainTask()
