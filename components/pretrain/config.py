"""The pretraining config: one dataclass per concern, validated where it is built.

`PretrainConfig` is what `lmforge pretrain --config FILE --set key=value` produces (via
`lmforge.config.load`) and what `pretrain()` consumes. Every check that needs no filesystem runs in
`__post_init__`, so an unknown strategy or a global batch that does not split over the workers
fails while the YAML is being read, before Ray or a process group starts; every message names the
dotted field. Checks that need the data (does `data.shards_dir` exist, does the vocabulary fit the
model) run in `pretrain()`'s preflight, still before Ray starts.

Batch arithmetic: one optimizer step consumes `data.global_batch_size` sequences of `data.seq_len`
tokens, spread over `ray.num_workers` workers (1 when running in-process), each running
`grad_accum_steps = global / (micro * workers)` forward/backward passes of `data.micro_batch_size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.model.config import PRESETS, ConfigError, ModelConfig

STRATEGIES = ("ddp", "fsdp", "deepspeed")
PRECISIONS = ("fp32", "bf16", "fp16")
DECAYS = ("cosine", "linear", "constant")
NO_DECAY_KINDS = ("norm", "bias", "embedding")


def _positive_int(section: str, name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{section}.{name} must be an integer >= {minimum}, got {value!r}")


def _choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r} is not one of: {', '.join(choices)}")


@dataclass
class ModelSection:
    """Which architecture to train: a preset plus field overrides, or an existing model directory."""

    preset: str = "tiny"  # a name from model.config.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, e.g. {n_layers: 4}
    # Continue pretraining from these weights (an lmforge / Hugging Face Llama model directory);
    # its config.json defines the architecture and `preset`/`overrides` are ignored.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.init_from is not None:
            return
        if self.preset not in PRESETS:
            raise ConfigError(
                f"model.preset={self.preset!r} is unknown; available: {', '.join(sorted(PRESETS))}"
            )
        try:  # validate the overrides now (vocab_size may still be filled in from the data later)
            ModelConfig.from_name(self.preset, **self.overrides)
        except ConfigError as err:
            raise ConfigError(f"model.overrides: {err}") from None
        except TypeError as err:  # pragma: no cover - from_dict rejects unknown names first
            raise ConfigError(f"model.overrides: {err}") from None

    def build(self, data_vocab_size: int, eos_id: int | None) -> ModelConfig:
        """The architecture to train. Unless `overrides` sets it, the vocabulary size is the token
        shards' (the tokenizer's), so the embedding always matches the data."""
        if self.init_from is not None:
            from lmforge.model.checkpoint import read_config

            cfg = read_config(self.init_from)
        else:
            values = dict(self.overrides)
            values.setdefault("vocab_size", data_vocab_size)
            if eos_id is not None and eos_id < values["vocab_size"]:
                values.setdefault("eos_token_id", eos_id)
            cfg = ModelConfig.from_name(self.preset, **values)
        if cfg.vocab_size < data_vocab_size:
            where = "model.init_from's config.json" if self.init_from else "model.overrides.vocab_size"
            raise ConfigError(
                f"{where}: vocab_size={cfg.vocab_size} is smaller than the token shards' vocabulary "
                f"({data_vocab_size}); token ids would index past the embedding"
            )
        return cfg


@dataclass
class DataSection:
    shards_dir: str = ""  # output of `lmforge tokenize` (index.json + <split>-NNNNN.bin)
    seq_len: int = 256  # tokens per training sequence (<= the model's max_seq_len)
    global_batch_size: int = 8  # sequences per optimizer step, all workers together
    micro_batch_size: int = 2  # sequences per forward/backward pass on one worker
    shuffle: bool = True
    # Tokenizer files copied into the final model directory; None = the one named in the shards' index.
    tokenizer_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.shards_dir:
            raise ConfigError(
                "data.shards_dir is required (a token-shard directory written by `lmforge tokenize`)"
            )
        for name in ("seq_len", "global_batch_size", "micro_batch_size"):
            _positive_int("data", name, getattr(self, name))
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"data.global_batch_size={self.global_batch_size} is not a multiple of "
                f"data.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class OptimSection:
    """AdamW with decoupled weight decay."""

    lr: float = 3e-4  # peak learning rate (reached at the end of warmup)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Parameter kinds that get no weight decay: any of norm, bias, embedding (the input embedding,
    # and the output head when it is tied to it).
    no_decay: list[str] = field(default_factory=lambda: list(NO_DECAY_KINDS))
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 = no clipping (the norm is still logged)
    # Layer-wise lr decay: block i of L gets lr * layer_lr_decay**(L - i); the embedding gets
    # decay**(L + 1), the final norm and the head decay**0 = 1. 1.0 = off.
    layer_lr_decay: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        unknown = sorted(set(self.no_decay) - set(NO_DECAY_KINDS))
        if unknown:
            raise ConfigError(
                f"optim.no_decay: unknown kind(s) {unknown}; choose from {', '.join(NO_DECAY_KINDS)}"
            )
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if not 0 < self.layer_lr_decay <= 1:
            raise ConfigError(f"optim.layer_lr_decay must be in (0, 1] (1 = off), got {self.layer_lr_decay}")


@dataclass
class ScheduleSection:
    max_steps: int = 1000  # optimizer steps in the whole run
    warmup_steps: int = 100  # linear warmup from 0 to optim.lr
    decay: str = "cosine"  # cosine | linear | constant, from optim.lr down to lr * min_lr_ratio at max_steps
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _positive_int("schedule", "max_steps", self.max_steps)
        _positive_int("schedule", "warmup_steps", self.warmup_steps, minimum=0)
        _choice("schedule", "decay", self.decay, DECAYS)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"schedule.warmup_steps={self.warmup_steps} exceeds schedule.max_steps={self.max_steps}"
            )


@dataclass
class PrecisionSection:
    # fp32: everything in fp32. bf16 / fp16: fp32 master weights and optimizer, matmuls in half
    # precision (autocast; FSDP casts the gathered parameters; DeepSpeed its own mixed precision).
    dtype: str = "fp32"
    initial_scale: float = 2.0**16  # fp16 only: dynamic loss scale to start from
    growth_interval: int = 2000  # fp16 only: steps without overflow before the scale doubles

    def __post_init__(self) -> None:
        _choice("precision", "dtype", self.dtype, PRECISIONS)
        if not self.initial_scale >= 1:
            raise ConfigError(f"precision.initial_scale must be >= 1, got {self.initial_scale}")
        _positive_int("precision", "growth_interval", self.growth_interval)


@dataclass
class StrategySection:
    """How the model is spread over the workers, and the transforms applied with it."""

    name: str = "ddp"  # ddp | fsdp | deepspeed
    zero_stage: int = 2  # deepspeed only: ZeRO stage 1, 2 or 3
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    compile: bool = False  # torch.compile each transformer block
    backend: str | None = None  # torch.distributed backend; None = nccl on GPUs, gloo on CPUs
    # CPU (glibc) only: after every N blocks' forward and before their backward, return the C heap's
    # free pages to the OS (lmforge/memory.py): lower peak RSS for a slower step; 0 = off
    release_memory_every: int = 0

    def __post_init__(self) -> None:
        _choice("strategy", "name", self.name, STRATEGIES)
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"strategy.zero_stage must be 1, 2 or 3, got {self.zero_stage!r}")
        if self.backend is not None:
            _choice("strategy", "backend", self.backend, ("nccl", "gloo"))
        if not (isinstance(self.release_memory_every, int) and self.release_memory_every >= 0):
            raise ConfigError(
                f"strategy.release_memory_every must be an integer >= 0 (blocks; 0 = off), "
                f"got {self.release_memory_every!r}"
            )


@dataclass
class CheckpointSection:
    every: int = 500  # save every N optimizer steps (and always at the end and on SIGTERM)
    keep_last: int = 3  # older checkpoints are deleted
    # Where Ray Train keeps the checkpoints: None = <output_dir>/checkpoints; s3://BUCKET/PREFIX = S3 /
    # MinIO at $LMFORGE_S3_ENDPOINT (Ray Train's storage_path; the run directory is PREFIX/checkpoints,
    # so `--resume auto` and a restarted worker group find them there). Needs ray.num_workers >= 1.
    storage: str | None = None

    def __post_init__(self) -> None:
        _positive_int("checkpoint", "every", self.every)
        _positive_int("checkpoint", "keep_last", self.keep_last)
        if self.storage is not None:
            from lmforge.storage import StorageError, is_s3_uri, split_s3_uri

            if not is_s3_uri(self.storage):
                raise ConfigError(
                    f"checkpoint.storage must be an s3://BUCKET/PREFIX URI (or unset for "
                    f"<output_dir>/checkpoints), got {self.storage!r}"
                )
            try:
                split_s3_uri(self.storage)
            except StorageError as err:
                raise ConfigError(f"checkpoint.storage: {err}") from None


@dataclass
class EvalSection:
    every: int = 500  # validation loss every N steps (and at the end); 0 = never
    batches: int = 20  # validation batches per evaluation on each worker (of data.micro_batch_size)
    split: str = "validation"

    def __post_init__(self) -> None:
        _positive_int("eval", "every", self.every, minimum=0)
        _positive_int("eval", "batches", self.batches)


@dataclass
class TrackingSection:
    enabled: bool = True  # log to MLflow (the console progress is always printed)
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite under .lmforge/
    experiment: str = "lmforge-pretrain"
    log_every: int = 10  # metrics every N optimizer steps
    log_model: bool = True  # also copy the final model directory into the MLflow run's artifacts
    # Peak dense bf16 FLOP/s of ONE device, for MFU. None = known GPUs are detected; on CPUs MFU is omitted.
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        _positive_int("tracking", "log_every", self.log_every)
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"tracking.peak_tflops must be > 0, got {self.peak_tflops}")
        if not self.experiment:
            raise ConfigError("tracking.experiment must not be empty")


@dataclass
class RaySection:
    num_workers: int = 2  # Ray Train workers; 0 = train in this process without Ray
    use_gpu: bool = False  # one GPU per worker
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # e.g. {CPU: 8}
    max_failures: int = 2  # worker-group restarts (from the last checkpoint) before giving up
    address: str | None = None  # Ray cluster; None = $RAY_ADDRESS, else a local Ray on this machine

    def __post_init__(self) -> None:
        _positive_int("ray", "num_workers", self.num_workers, minimum=0)
        _positive_int("ray", "max_failures", self.max_failures, minimum=-1)


@dataclass
class PretrainConfig:
    output_dir: str = "out/pretrain"  # checkpoints/, model/ and config.yaml go here
    run_name: str | None = None  # MLflow run name; None = the output directory's name
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=lambda: DataSection(shards_dir="out/tokens"))
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    ray: RaySection = field(default_factory=RaySection)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        per_step = self.data.micro_batch_size * self.world_size
        if self.data.global_batch_size % per_step:
            raise ConfigError(
                f"data.global_batch_size={self.data.global_batch_size} is not divisible by "
                f"data.micro_batch_size={self.data.micro_batch_size} x "
                f"ray.num_workers={self.world_size} = {per_step}; "
                f"use a multiple of {per_step} (each worker must run whole micro-batches)"
            )
        if self.model.init_from is None:
            max_seq = ModelConfig.from_name(self.model.preset, **self.model.overrides).max_seq_len
            if self.data.seq_len > max_seq:
                raise ConfigError(
                    f"data.seq_len={self.data.seq_len} exceeds the model's context "
                    f"(model max_seq_len={max_seq}); lower data.seq_len or set model.overrides.max_seq_len"
                )
        if self.strategy.name == "deepspeed" and self.strategy.compile:
            raise ConfigError(
                "strategy.compile is not supported with strategy.name=deepspeed (use ddp or fsdp)"
            )
        if self.checkpoint.storage and self.local:
            raise ConfigError(
                "checkpoint.storage (s3://) needs Ray Train (ray.num_workers >= 1): an in-process run "
                "checkpoints to <output_dir>/checkpoints"
            )

    # ---- derived figures --------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Data-parallel workers: ray.num_workers, or 1 when training in-process."""
        return max(1, self.ray.num_workers)

    @property
    def grad_accum_steps(self) -> int:
        return self.data.global_batch_size // (self.data.micro_batch_size * self.world_size)

    @property
    def tokens_per_step(self) -> int:
        return self.data.global_batch_size * self.data.seq_len

    @property
    def local(self) -> bool:
        return self.ray.num_workers == 0

    @property
    def resolved_run_name(self) -> str:
        return self.run_name or Path(self.output_dir).name

    def checkpoints_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    def model_dir(self) -> Path:
        return Path(self.output_dir) / "model"


def describe(cfg: PretrainConfig) -> str:
    """One line for the console: what is about to run."""
    return (
        f"{cfg.strategy.name} x{cfg.world_size} ({'in-process' if cfg.local else 'Ray Train'}), "
        f"{cfg.precision.dtype}, "
        f"{cfg.schedule.max_steps} steps x {cfg.data.global_batch_size} seq x {cfg.data.seq_len} tok "
        f"(micro {cfg.data.micro_batch_size}, accum {cfg.grad_accum_steps}), peak lr {cfg.optim.lr:g}, "
        f"{_count(cfg.schedule.max_steps * cfg.tokens_per_step)} tokens"
    )


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"
