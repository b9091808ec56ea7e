"""The whole lifecycle on one machine: curate -> tokenizer -> tokenize -> pretrain -> register -> generate.

`lmforge run` calls `run_lifecycle`. Each step is the same stage function the CLI verb and the
Kubeflow component call; this module only wires outputs to inputs and records what happened in
`<workdir>/run.json`, so a finished step's outputs can be inspected (or reused by hand) while later
steps run. With embedded defaults it needs no service: local folders, MLflow on sqlite, and Ray
started in-process when `pretrain.ray.num_workers > 0`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.components.curate.config import CurateConfig
from lmforge.components.pretrain.config import PretrainConfig
from lmforge.model.config import ConfigError


@dataclass
class TokenizerSection:
    vocab_size: int = 8192  # total ids including the 256 bytes and the special tokens
    min_frequency: int = 2
    holdout_fraction: float = 0.1  # of the curated train documents, for the fertility report

    def __post_init__(self) -> None:
        if self.vocab_size <= 0:
            raise ConfigError(f"tokenizer.vocab_size must be positive, got {self.vocab_size}")
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"tokenizer.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")


@dataclass
class GenerateSection:
    prompts: list[str] = field(default_factory=lambda: ["The Python tutorial"])
    max_new_tokens: int = 48
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("generate.prompts must hold at least one prompt")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"generate.max_new_tokens must be positive, got {self.max_new_tokens}")


@dataclass
class RegisterSection:
    enabled: bool = True
    model_name: str = "lmforge-demo"  # registered model name in MLflow
    alias: str = "candidate"  # alias pointed at the new version (promote to e.g. "champion" later)


@dataclass
class LifecycleConfig:
    workdir: str = ".lmforge/demo"  # every stage writes under it: data/, tokenizer/, tokens/, pretrain/
    inputs: list[str] = field(default_factory=lambda: ["data/sample/python-docs"])  # paths or s3:// URIs
    curate: CurateConfig = field(default_factory=CurateConfig)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    # output_dir and data.shards_dir are set by the run (under workdir) unless given explicitly
    pretrain: dict[str, Any] = field(default_factory=dict)
    register: RegisterSection = field(default_factory=RegisterSection)
    generate: GenerateSection = field(default_factory=GenerateSection)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs must name at least one path or s3:// URI")

    def pretrain_config(self) -> PretrainConfig:
        """The pretraining config with this run's paths filled in (validated like `lmforge pretrain`'s)."""
        from lmforge.config import build

        raw = json.loads(json.dumps(self.pretrain))  # deep copy
        work = Path(self.workdir)
        raw.setdefault("output_dir", str(work / "pretrain"))
        raw.setdefault("data", {}).setdefault("shards_dir", str(work / "tokens"))
        try:
            return build(PretrainConfig, raw)
        except ConfigError as err:
            raise ConfigError(str(err).replace("invalid config: ", "invalid config: pretrain.")) from None


@dataclass
class LifecycleResult:
    workdir: Path
    model_dir: Path
    registered: str | None  # models:/NAME@ALIAS
    samples: list[dict[str, Any]]
    steps: dict[str, dict[str, Any]]


def run_lifecycle(cfg: LifecycleConfig, log: Callable[[str], None] = print) -> LifecycleResult:
    from lmforge.components.curate.pipeline import curate
    from lmforge.components.pretrain.stage import pretrain
    from lmforge.components.tokenize_shards import tokenize_dataset
    from lmforge.components.tokenizer import train_tokenizer

    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pretrain_cfg = cfg.pretrain_config()  # validated before any work starts
    record: dict[str, dict[str, Any]] = {}

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        log(f"lmforge run: {name} ...")
        start = time.perf_counter()
        out = fn()
        out["seconds"] = round(time.perf_counter() - start, 2)
        record[name] = out
        (work / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        log(f"lmforge run: {name} done in {out['seconds']} s")
        return out

    data_dir, tok_dir, shards_dir = work / "data", work / "tokenizer", work / "tokens"

    def do_curate() -> dict[str, Any]:
        result = curate(cfg.inputs, data_dir, cfg.curate, overwrite=True)
        return {"output": str(data_dir), **result.metrics()}

    def do_tokenizer() -> dict[str, Any]:
        result = train_tokenizer(
            [data_dir / "train"],
            tok_dir,
            vocab_size=cfg.tokenizer.vocab_size,
            min_frequency=cfg.tokenizer.min_frequency,
            holdout_fraction=cfg.tokenizer.holdout_fraction,
        )
        return {"output": str(tok_dir), **result.metrics()}

    def do_tokenize() -> dict[str, Any]:
        result = tokenize_dataset(data_dir, tok_dir, shards_dir, overwrite=True)
        return {"output": str(shards_dir), **result.metrics()}

    def do_pretrain() -> dict[str, Any]:
        result = pretrain(dataclasses.replace(pretrain_cfg), resume=None)
        if result.model_dir is None:
            raise RuntimeError("pretraining stopped before writing a model (preempted?)")
        return {"model_dir": str(result.model_dir), "mlflow_run_id": result.mlflow_run_id, **result.metrics}

    step("curate", do_curate)
    step("tokenizer", do_tokenizer)
    step("tokenize", do_tokenize)
    trained = step("pretrain", do_pretrain)
    model_dir = Path(trained["model_dir"])

    registered = None
    if cfg.register.enabled:
        reg = step("register", lambda: _register(model_dir, cfg.register, trained.get("mlflow_run_id")))
        registered = reg["uri"]

    samples = step("generate", lambda: {"samples": _generate(model_dir, cfg.generate)})["samples"]
    return LifecycleResult(work, model_dir, registered, samples, record)


def _register(model_dir: Path, section: RegisterSection, run_id: str | None) -> dict[str, Any]:
    from lmforge.registry import RegistryClient

    version = RegistryClient().register_model_dir(model_dir, section.model_name, alias=section.alias)
    return {
        "uri": f"models:/{section.model_name}@{section.alias}",
        "version": str(version.version),
        "source_run": run_id,
    }


def _generate(model_dir: Path, section: GenerateSection) -> list[dict[str, Any]]:
    from lmforge.model.generation import SamplingParams
    from lmforge.serving.textgen import generate_from_dir

    samples = []
    for i, prompt in enumerate(section.prompts):
        params = SamplingParams(
            max_new_tokens=section.max_new_tokens,
            temperature=section.temperature,
            top_k=section.top_k,
            seed=section.seed + i,
        )
        result = generate_from_dir(model_dir, prompt, params)
        samples.append({"prompt": prompt, "completion": result.text, "tokens": len(result.token_ids)})
    return samples
