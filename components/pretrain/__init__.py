"""Pretraining stage: train the model package on token shards, in-process or on Ray Train.

config.py         PretrainConfig (one dataclass per concern, validated on construction)
stage.py          pretrain(config) -> PretrainResult: preflight, tracking, run, final model
loop.py           the training loop, one function
strategies.py     DDP / FSDP / DeepSpeed ZeRO (+ activation checkpointing, compile) as transforms
optim.py          AdamW parameter groups, warmup + cosine/linear schedule, layer-wise lr decay
checkpointing.py  atomic, exactly-resumable checkpoints; consolidation to a model directory
env.py            in-process environment (rank, device, SIGTERM, checkpoint publishing)
trainer.py        Ray TorchTrainer wiring (the Ray environment, failure recovery, preemption)
tracking.py       MLflow tracker + no-op stand-in, loss-curve PNG, console progress
"""

from lmforge.components.pretrain.checkpointing import consolidate
from lmforge.components.pretrain.config import PretrainConfig
from lmforge.components.pretrain.stage import PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "consolidate", "pretrain"]
