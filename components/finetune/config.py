"""The fine-tuning config: `lmforge finetune --config FILE --set key=value` -> `FinetuneConfig`.

The training sections keep pretraining's names and classes (components/pretrain/config.py):
`optim.*`, `schedule.*`, `precision.*`, `strategy.*`, `checkpoint.*`, `eval.*`, `tracking.*`,
`ray.*`, `data.global_batch_size`, `data.micro_batch_size`. What is new:

    base_model         a model directory (lmforge or imported with `lmforge import-hf`) or models:/NAME@ALIAS
    method             lora | qlora | full
    lora.*             r, alpha, dropout, target_modules (names or one regex), use_rslora
    qlora.bits         8 or 4: the base must be a model directory from `lmforge quantize` in this format
    data.train / data.validation / data.format (instruction | chat | text) and the field names
    max_seq_len, packing, overlong (truncate | drop), merge, register.*

Every check that needs no filesystem runs here (`__post_init__`); checks of files (base model,
data fields, target modules present in the model) run in stage.preflight, still before Ray starts.
`to_train_config()` is the PretrainConfig the shared training loop runs on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.components.pretrain.config import (
    CheckpointSection,
    DataSection,
    EvalSection,
    ModelSection,
    OptimSection,
    PrecisionSection,
    PretrainConfig,
    RaySection,
    ScheduleSection,
    StrategySection,
    TrackingSection,
    _choice,
    _positive_int,
)
from lmforge.config import load
from lmforge.model.config import ConfigError

METHODS = ("lora", "qlora", "full")
FORMATS = ("instruction", "chat", "text")
OVERLONG = ("truncate", "drop")
QLORA_BITS = (8, 4)
# The Linear layers of a Llama block, by their Hugging Face names (what lora.target_modules may name).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class FinetuneDataSection:
    train: str = ""  # JSONL, one example per line
    validation: str | None = None  # JSONL; None = no validation loss
    format: str = "instruction"  # instruction (prompt/response) | chat (messages) | text
    prompt_field: str = "prompt"  # instruction: the input, not scored
    response_field: str = "response"  # instruction: the output, scored (then the eos token)
    messages_field: str = "messages"  # chat: [{role, content}, ...]; assistant turns are scored
    text_field: str = "text"  # text: continued pretraining, every token scored
    global_batch_size: int = 8  # examples (rows) per optimizer step, all workers together
    micro_batch_size: int = 2  # rows per forward/backward pass on one worker
    shuffle: bool = True
    # Tokenizer files (tokenizer.json, tokenizer_config.json with the chat template); None = the base's.
    tokenizer_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("data.train is required (a JSONL file of training examples)")
        _choice("data", "format", self.format, FORMATS)
        for name in ("global_batch_size", "micro_batch_size"):
            _positive_int("data", name, getattr(self, name))
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"data.global_batch_size={self.global_batch_size} is not a multiple of "
                f"data.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class LoraSection:
    r: int = 8  # adapter rank
    alpha: float = 16.0  # scaling alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the adapter's input
    # Module names (any of TARGET_MODULES) or one regular expression over full module paths,
    # e.g. 'model\.layers\.\d+\.self_attn\.(q|v)_proj'.
    target_modules: list[str] | str = field(default_factory=lambda: list(ATTENTION))
    use_rslora: bool = False

    def __post_init__(self) -> None:
        _positive_int("lora", "r", self.r)
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ConfigError(
                    f"lora.target_modules={self.target_modules!r} is not a valid regular expression: {err}"
                ) from None
        else:
            if not self.target_modules:
                raise ConfigError(f"lora.target_modules is empty; choose from {', '.join(TARGET_MODULES)}")
            unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
            if unknown:
                raise ConfigError(
                    f"lora.target_modules: unknown module(s) {', '.join(unknown)}; valid names: "
                    f"{', '.join(TARGET_MODULES)} (or one regular expression over module paths)"
                )


@dataclass
class QloraSection:
    bits: int = 8  # the quantized base's weight format: 8 (int8) or 4 (int4), from `lmforge quantize`

    def __post_init__(self) -> None:
        if self.bits not in QLORA_BITS:
            raise ConfigError(f"qlora.bits must be 8 or 4, got {self.bits!r}")


@dataclass
class RegisterSection:
    # Register the adapter as a version of this model in the MLflow registry (tagged with the base);
    # None = do not register.
    model_name: str | None = None
    alias: str | None = None


def _finetune_tracking() -> TrackingSection:
    return TrackingSection(experiment="lmforge-finetune", log_every=5, log_model=False)


@dataclass
class FinetuneConfig:
    base_model: str = ""  # model directory or models:/NAME@ALIAS / models:/NAME/VERSION
    method: str = "lora"  # lora | qlora | full
    output_dir: str = "out/finetune"  # adapter/, merged/, checkpoints/, config.yaml, data_stats.json
    run_name: str | None = None  # MLflow run name; None = the output directory's name
    seed: int = 0
    max_seq_len: int = 512  # tokens per row (an example's tokens minus one: inputs are shifted targets)
    packing: bool = False  # several short examples per row, no attention across them; else padding
    overlong: str = "truncate"  # an example longer than max_seq_len: truncate (keep its start) | drop
    merge: bool = False  # also write OUTPUT/merged: a full model directory with the adapter merged in
    data: FinetuneDataSection = field(default_factory=lambda: FinetuneDataSection(train="data.jsonl"))
    lora: LoraSection = field(default_factory=LoraSection)
    qlora: QloraSection = field(default_factory=QloraSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=2e-4, weight_decay=0.0))
    schedule: ScheduleSection = field(default_factory=lambda: ScheduleSection(max_steps=100, warmup_steps=10))
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=50, keep_last=2))
    eval: EvalSection = field(default_factory=lambda: EvalSection(every=50, batches=20))
    tracking: TrackingSection = field(default_factory=_finetune_tracking)
    ray: RaySection = field(default_factory=lambda: RaySection(num_workers=0))
    register: RegisterSection = field(default_factory=RegisterSection)

    def __post_init__(self) -> None:
        if not self.base_model:
            raise ConfigError("base_model is required (a model directory or models:/NAME@ALIAS)")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of: {', '.join(METHODS)}")
        if self.overlong not in OVERLONG:
            raise ConfigError(f"overlong={self.overlong!r} is not one of: {', '.join(OVERLONG)}")
        if (
            not isinstance(self.max_seq_len, int)
            or isinstance(self.max_seq_len, bool)
            or self.max_seq_len < 2
        ):
            raise ConfigError(f"max_seq_len must be an integer >= 2, got {self.max_seq_len!r}")
        if self.strategy.name != "ddp":
            raise ConfigError(
                f"strategy.name={self.strategy.name!r}: fine-tuning supports ddp only for now "
                "(adapters are small; FSDP / DeepSpeed sharding of a frozen base is not wired yet)"
            )
        if self.method == "qlora" and self.merge:
            raise ConfigError(
                "merge=true with method=qlora: the base is quantized, so a merged model would lose the "
                "adapter's precision; merge into the full-precision base instead: "
                "`lmforge merge --base FP32_DIR --adapter OUTPUT/adapter --output DIR`"
            )
        if self.strategy.compile:
            raise ConfigError("strategy.compile is not supported by fine-tuning yet (set it to false)")
        self.to_train_config()  # batch arithmetic over the workers, checked as pretraining does

    # ---- the shared training loop's view ------------------------------------------------------
    def to_train_config(self) -> PretrainConfig:
        """The PretrainConfig the loop (components/pretrain/loop.py) and Ray wiring run on: same
        optimizer, schedule, strategy, checkpoint, eval, tracking and Ray sections; the rows of
        `max_seq_len` tokens take the place of the token shards' sequences."""
        try:
            return PretrainConfig(
                output_dir=self.output_dir,
                run_name=self.run_name,
                seed=self.seed,
                model=ModelSection(init_from=self.base_model),
                data=DataSection(
                    shards_dir=self.data.train,
                    seq_len=self.max_seq_len,
                    global_batch_size=self.data.global_batch_size,
                    micro_batch_size=self.data.micro_batch_size,
                    shuffle=self.data.shuffle,
                    tokenizer_dir=self.data.tokenizer_dir,
                ),
                optim=self.optim,
                schedule=self.schedule,
                precision=self.precision,
                strategy=self.strategy,
                checkpoint=self.checkpoint,
                eval=self.eval if self.data.validation else EvalSection(every=0, batches=self.eval.batches),
                tracking=self.tracking,
                ray=self.ray,
            )
        except ConfigError as err:
            raise ConfigError(str(err).replace("data.seq_len", "max_seq_len")) from None

    @property
    def resolved_run_name(self) -> str:
        return self.run_name or Path(self.output_dir).name

    def adapter_dir(self) -> Path:
        return Path(self.output_dir) / "adapter"

    def merged_dir(self) -> Path:
        return Path(self.output_dir) / "merged"

    def checkpoints_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"


def load_finetune_config(path: str | Path | None, overrides: list[str]) -> FinetuneConfig:
    """Read a YAML file (paths in it are relative to the current directory) plus KEY=VALUE overrides."""
    return load(FinetuneConfig, path, overrides)


def describe(cfg: FinetuneConfig) -> str:
    what = cfg.method if cfg.method == "full" else f"{cfg.method} r={cfg.lora.r}"
    layout = "packed" if cfg.packing else "padded"
    return (
        f"{what}, {cfg.data.format} data, {cfg.schedule.max_steps} steps x "
        f"{cfg.data.global_batch_size} rows x {cfg.max_seq_len} tok ({layout}), "
        f"{cfg.strategy.name} x{max(1, cfg.ray.num_workers)} "
        f"({'in-process' if cfg.ray.num_workers == 0 else 'Ray Train'}), peak lr {cfg.optim.lr:g}"
    )


def to_flat(cfg: FinetuneConfig) -> dict[str, Any]:
    from lmforge.components.pretrain.tracking import flatten
    from lmforge.config import to_dict

    return flatten(to_dict(cfg))
