"""The recovery fine-tune after pruning: a short run of the pretraining loop from the pruned model.

Structured pruning leaves a dense, smaller model: recovery is plain continued pretraining from it
(`model.init_from`). Magnitude pruning leaves zeros that must stay zeros: `KeepZerosTask` masks the
gradient of every pruned weight, so AdamW never moves it (a zero gradient keeps Adam's moments at
zero, and decoupled weight decay scales zero to zero).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from lmforge.components.pretrain.config import PretrainConfig
from lmforge.components.pretrain.task import TrainTask
from lmforge.config import build

if TYPE_CHECKING:
    from lmforge.components.prune.config import PruneConfig
    from lmforge.model.config import ModelConfig


class KeepZerosTask(TrainTask):
    """Pretraining from `model.init_from`, with the gradients of its zero weights masked."""

    name = "prune-recovery"

    def build_model(self, cfg: PretrainConfig, model_cfg: ModelConfig) -> nn.Module:
        from lmforge.components.prune.magnitude import prunable_weights

        model = super().build_model(cfg, model_cfg)
        for param in prunable_weights(model, include_embeddings=True).values():
            mask = param.detach() != 0
            if not bool(mask.all()):
                param.register_hook(lambda grad, m=mask: grad * m.to(grad.device))
        return model


def recovery_config(cfg: PruneConfig, pruned_dir: Path, work_dir: Path) -> PretrainConfig:
    """The pretraining config of the recovery run: the pruned model on `cfg.data`, in-process by default."""
    r = cfg.recovery
    tokenizer = str(pruned_dir) if (pruned_dir / "tokenizer.json").is_file() else None
    return build(
        PretrainConfig,
        {
            "output_dir": str(work_dir),
            "model": {"init_from": str(pruned_dir)},
            "data": {
                "shards_dir": cfg.data,
                "seq_len": r.seq_len,
                "global_batch_size": r.global_batch_size,
                "micro_batch_size": r.micro_batch_size,
                "tokenizer_dir": tokenizer,
            },
            "optim": {"lr": r.lr, "weight_decay": 0.0},
            "schedule": {"max_steps": r.steps, "warmup_steps": r.warmup_steps, "decay": "cosine"},
            "checkpoint": {"every": r.steps, "keep_last": 1},
            "eval": {"every": 0},
            "tracking": {
                "enabled": r.tracking,
                "experiment": "lmforge-prune",
                "log_every": max(1, min(10, r.steps)),
                "log_model": False,
            },
            "ray": {"num_workers": r.num_workers},
        },
    )


def count_zeros(model: nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in model.parameters())


__all__ = ["KeepZerosTask", "count_zeros", "recovery_config"]
