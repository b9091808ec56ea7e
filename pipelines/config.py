"""The `lmforge run` config: one section per step, every section validated before any step starts.

`lmforge.config.load(LifecycleConfig, "configs/demo.yaml", ["tokenizer.vocab_size=600"])` checks each
section on its own (types, ranges, names) while the YAML is read. `LifecycleConfig.check()` then
builds the pretraining config with this run's paths and checks what only the sections together
can tell (a model vocabulary smaller than the tokenizer's, an evaluation split curation never
fills). `lmforge run` (`local.run_pipeline_locally`) calls it first, so a bad value fails before
curation touches the workdir.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.components.curate.config import CurateConfig
from lmforge.components.pretrain.config import PretrainConfig
from lmforge.components.quantize import METHODS
from lmforge.errors import InputNotFoundError
from lmforge.model.config import ConfigError

_ALIAS = re.compile(r"^[\w\-]+$")  # MLflow's rule for alias names
_VERSION_LIKE = re.compile(r"^[vV]\d+$")  # MLflow reserves these (they name versions)


@dataclass
class TokenizerSection:
    vocab_size: int = 8192  # total ids including the 256 bytes and the special tokens
    min_frequency: int = 2
    holdout_fraction: float = 0.1  # of the curated train documents, for the fertility report

    def __post_init__(self) -> None:
        from lmforge.components.tokenizer import BYTE_ALPHABET_SIZE, SpecialTokens

        minimum = BYTE_ALPHABET_SIZE + len(SpecialTokens().all())
        if self.vocab_size < minimum:
            raise ConfigError(
                f"vocab_size={self.vocab_size} is too small: it must hold the {BYTE_ALPHABET_SIZE} byte "
                f"tokens and the {minimum - BYTE_ALPHABET_SIZE} special tokens (at least {minimum})"
            )
        if self.min_frequency < 1:
            raise ConfigError(f"min_frequency must be >= 1, got {self.min_frequency}")
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")


@dataclass
class GenerateSection:
    prompts: list[str] = field(default_factory=lambda: ["The Python tutorial"])
    max_new_tokens: int = 48
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40
    seed: int = 0  # prompt i is sampled with seed + i

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("prompts must hold at least one prompt")
        if any(not p.strip() for p in self.prompts):
            raise ConfigError("prompts must not hold an empty prompt")
        try:  # the generation code's own checks, before any step runs
            self.sampling(0)
        except ConfigError as err:
            raise ConfigError(str(err).removeprefix("sampling.")) from None

    def sampling(self, index: int):
        """The sampling parameters of prompt `index`."""
        from lmforge.model.generation import SamplingParams

        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self.seed + index,
        )


@dataclass
class RegisterSection:
    enabled: bool = True
    model_name: str = "lmforge-demo"  # registered model name in MLflow
    alias: str = "candidate"  # alias pointed at the new version (promote to e.g. "champion" later)

    def __post_init__(self) -> None:
        if not self.model_name.strip() or any(c in self.model_name for c in "/:@"):
            raise ConfigError(
                f"model_name must be a non-empty name without '/', ':' or '@', got {self.model_name!r}"
            )
        if not _ALIAS.match(self.alias) or len(self.alias) > 255:
            raise ConfigError(f"alias must be letters, digits, '_' or '-' (at most 255), got {self.alias!r}")
        if self.alias.lower() == "latest" or _VERSION_LIKE.match(self.alias):
            raise ConfigError(f"alias {self.alias!r} is reserved by MLflow (it names versions)")


@dataclass
class FinetuneSection:
    """LoRA fine-tuning after pretraining (`lmforge finetune`'s config); off unless enabled."""

    enabled: bool = False
    config: str | None = None  # a finetune YAML (lmforge finetune --config); None: its defaults
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE, as `lmforge finetune --set`
    lora_rank: int | None = None  # shortcut for the adapter rank (a pipeline parameter)

    def __post_init__(self) -> None:
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if any("=" not in o for o in self.overrides):
            raise ConfigError("overrides must be KEY=VALUE strings")


QUANTIZE_METHODS = (
    METHODS  # int8, int4, int4-awq, int4-gptq (the calibrated two read the curated train split)
)


@dataclass
class QuantizeSection:
    """Quantize the final model (`lmforge quantize`); method "" or "none" skips it."""

    method: str = ""
    group_size: int = 64
    # calibration (the curated train split; int4-awq / int4-gptq need it, the others report the loss
    # on it before and after): None = `lmforge quantize`'s defaults
    num_sequences: int | None = None
    seq_len: int | None = None
    min_sequences: int | None = None

    def __post_init__(self) -> None:
        if self.method == "none":
            self.method = ""
        for name, low in (("num_sequences", 1), ("seq_len", 2), ("min_sequences", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.method and self.method not in QUANTIZE_METHODS:
            raise ConfigError(
                f"method must be one of {', '.join(QUANTIZE_METHODS)} or empty, got {self.method!r}"
            )
        if self.group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {self.group_size}")


@dataclass
class EvaluateSection:
    """The evaluation suite run on the final model (`lmforge evaluate`); suite None skips it."""

    suite: str | None = None  # a suite YAML, e.g. configs/eval-demo.yaml
    limit: int | None = None  # items per task (None: all)
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class GateSection:
    """Promotion: the version registered by the run gets `register.alias`; it is promoted to
    `promote_alias` (and deployed) only when the gate passes. Without a gate file the pipeline
    promotes nothing. `max_regression` rules compare with the current `promote_alias` holder; on
    the first run (no holder yet) they are skipped."""

    rules: str | None = None  # a gate YAML, e.g. configs/gate-demo.yaml (needs evaluate.suite)
    promote_alias: str = "champion"

    def __post_init__(self) -> None:
        if not _ALIAS.match(self.promote_alias) or _VERSION_LIKE.match(self.promote_alias):
            raise ConfigError(f"promote_alias must be a valid MLflow alias, got {self.promote_alias!r}")


@dataclass
class LifecycleConfig:
    workdir: str = ".lmforge/demo"  # every stage writes under it: data/, tokenizer/, tokens/, pretrain/
    inputs: list[str] = field(default_factory=lambda: ["data/sample/python-docs"])  # paths or s3:// URIs
    curate: CurateConfig = field(default_factory=CurateConfig)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    # output_dir and data.shards_dir are set by the run (under workdir) unless given explicitly;
    # run_name defaults to register.model_name
    pretrain: dict[str, Any] = field(default_factory=dict)
    register: RegisterSection = field(default_factory=RegisterSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    # what follows pretraining in the pipeline (finetune and quantize pass the model through when off)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    quantize: QuantizeSection = field(default_factory=QuantizeSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    gate: GateSection = field(default_factory=GateSection)
    # KFP pipeline root of cluster runs (`lmforge pipeline submit`): s3://BUCKET/PREFIX (MinIO/S3) where
    # the backend stores every task's artifacts; None = the backend's default. kfp.local ignores it.
    pipeline_root: str | None = None

    def __post_init__(self) -> None:
        if not self.workdir:
            raise ConfigError("workdir must not be empty")
        if not self.inputs:
            raise ConfigError("inputs must name at least one path or s3:// URI")

    def pretrain_config(self) -> PretrainConfig:
        """The pretraining config with this run's paths filled in (validated like `lmforge pretrain`'s)."""
        from lmforge.config import build

        raw = json.loads(json.dumps(self.pretrain))  # deep copy
        work = Path(self.workdir).expanduser().resolve()
        raw.setdefault("output_dir", str(work / "pretrain"))
        raw.setdefault("run_name", self.register.model_name)
        if not isinstance(raw.setdefault("data", {}), dict):
            raise ConfigError("invalid config: pretrain.data must be a section")
        raw["data"].setdefault("shards_dir", str(work / "tokens"))
        try:
            return build(PretrainConfig, raw)
        except ConfigError as err:
            raise ConfigError(str(err).replace("invalid config: ", "invalid config: pretrain.")) from None

    def check_pipeline_sections(self) -> None:
        """The pipeline-only sections, checked together (not in `__post_init__`: a pipeline component
        builds this config from only the sections it reads)."""
        if self.gate.rules and not self.evaluate.suite:
            raise ConfigError("invalid config: gate.rules needs evaluate.suite: the gate judges its metrics")
        if self.gate.rules and self.gate.promote_alias == self.register.alias:
            raise ConfigError(
                f"invalid config: gate.promote_alias and register.alias are both {self.register.alias!r}: "
                "the gate would promote nothing"
            )

    def check(self) -> PretrainConfig:
        """Everything the sections can only tell together, and that the local inputs exist;
        returns the pretraining config."""
        missing = [i for i in self.inputs if not str(i).startswith("s3://") and not Path(i).exists()]
        if missing:
            raise InputNotFoundError(f"inputs: {', '.join(missing)} does not exist")
        pretrain = self.pretrain_config()
        model_vocab = pretrain.model.overrides.get("vocab_size")
        if (
            pretrain.model.init_from is None
            and model_vocab is not None
            and model_vocab < self.tokenizer.vocab_size
        ):
            raise ConfigError(
                f"invalid config: pretrain.model.overrides.vocab_size={model_vocab} is smaller than "
                f"tokenizer.vocab_size={self.tokenizer.vocab_size}; leave it unset to take the tokenizer's"
            )
        if pretrain.eval.every:
            shares = {
                "train": 1.0,
                "validation": self.curate.split.validation,
                "test": self.curate.split.test,
            }
            if pretrain.eval.split not in shares:
                raise ConfigError(
                    f"invalid config: pretrain.eval.split={pretrain.eval.split!r}: curation writes only "
                    "train, validation and test"
                )
            if not shares[pretrain.eval.split]:
                raise ConfigError(
                    f"invalid config: pretrain.eval.split={pretrain.eval.split!r} will be empty "
                    f"(curate.split.{pretrain.eval.split}=0); give it a share or set pretrain.eval.every=0"
                )
        return pretrain
