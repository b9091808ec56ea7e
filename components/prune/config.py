"""The pruning config: what `lmforge prune --model DIR --sparsity S --method M --output DIR --set ...` builds.

Every check that needs no filesystem runs in `__post_init__` (each message names the field); the
model directory and token shards are checked by the stage before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.model.config import ConfigError

METHODS = ("magnitude", "structured")


@dataclass
class StructuredSection:
    """What structured pruning removes. The same fraction `sparsity` of each kind, in every layer
    (a Llama config has one intermediate_size and one head count for all layers)."""

    mlp: bool = True  # remove SwiGLU channels: rows of gate/up_proj, columns of down_proj
    heads: bool = True  # remove attention kv-groups: a kv head with the query heads that read it
    multiple_of: int = 1  # keep a channel count that is a multiple of this (e.g. 64 for GPU kernels)
    # Batches of `eval_split` whose activations score the channels and heads (|input| x weight
    # norm, as Wanda does); 0 or no `data` = score by weight norms only.
    calibration_batches: int = 4

    def __post_init__(self) -> None:
        if not (self.mlp or self.heads):
            raise ConfigError("structured.mlp and structured.heads are both false: nothing to prune")
        if not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ConfigError(f"structured.multiple_of must be an integer >= 1, got {self.multiple_of!r}")
        if self.calibration_batches < 0:
            raise ConfigError(f"structured.calibration_batches must be >= 0, got {self.calibration_batches}")


@dataclass
class RecoverySection:
    """An optional short fine-tune of the pruned model on `data`'s train split, through the
    pretraining loop (magnitude pruning keeps its zeros: their gradients are masked)."""

    steps: int = 0  # optimizer steps; 0 = no recovery
    lr: float = 1e-4
    warmup_steps: int = 0
    seq_len: int = 128
    global_batch_size: int = 8
    micro_batch_size: int = 4
    num_workers: int = 0  # Ray Train workers; 0 = in this process
    work_dir: str | None = None  # checkpoints and logs of the recovery run; None = <output>-recovery
    tracking: bool = False  # log the recovery run to MLflow (experiment lmforge-prune)

    def __post_init__(self) -> None:
        for name in ("steps", "warmup_steps", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"recovery.{name} must be an integer >= 0, got {value!r}")
        for name in ("seq_len", "global_batch_size", "micro_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"recovery.{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"recovery.lr must be > 0, got {self.lr}")
        if self.steps and self.warmup_steps > self.steps:
            raise ConfigError(
                f"recovery.warmup_steps={self.warmup_steps} exceeds recovery.steps={self.steps}"
            )


@dataclass
class PruneConfig:
    model: str = ""  # the model directory to prune (lmforge / Hugging Face Llama layout)
    output: str = ""  # the pruned model directory to write
    method: str = "magnitude"  # magnitude | structured
    # magnitude: the fraction of the prunable weights set to zero (the smallest |w| over all of
    # them, one global threshold); structured: the fraction of MLP channels and kv-groups removed.
    sparsity: float = 0.5
    # magnitude: the matrices of the transformer blocks are pruned; also the embedding / output head?
    include_embeddings: bool = False
    data: str | None = None  # token shards (`lmforge tokenize`): quality, calibration, recovery
    eval_split: str = "validation"
    eval_seq_len: int = 128
    eval_batches: int = 8  # batches of 4 sequences scored before and after pruning
    structured: StructuredSection = field(default_factory=StructuredSection)
    recovery: RecoverySection = field(default_factory=RecoverySection)

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model is required (--model DIR)")
        if not self.output:
            raise ConfigError("output is required (--output DIR)")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of: {', '.join(METHODS)}")
        if not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity must be in (0, 1), got {self.sparsity!r}")
        for name in ("eval_seq_len", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.recovery.steps and not self.data:
            raise ConfigError(
                "recovery.steps > 0 needs data (--data SHARDS): the recovery fine-tune trains on it"
            )
