"""The fine-tuning stage function: `finetune(config) -> FinetuneResult` (`lmforge finetune`).

1. preflight, before any Ray or process group exists: paths absolute, the base model resolved
   (a directory, or models:/ downloaded from the registry) and checked against `method`, the
   target modules checked against the model, the data read and tokenized once (format errors,
   overlong / dropped counts in data_stats.json), the resume target chosen;
2. an MLflow run (experiment `tracking.experiment`): params, trainable parameter count and %;
3. training with the shared loop (components/pretrain/loop.py) and a `FinetuneTask`: in this
   process (`ray.num_workers: 0`) or on Ray Train workers, with the same checkpoints and exact resume;
4. export from the newest checkpoint: OUTPUT/adapter (PEFT layout: adapter_config.json with the
   base recorded in base_model_name_or_path, adapter_model.safetensors, plus the tokenizer files),
   OUTPUT/merged when `merge: true` (and always for `method: full`, whose output is a whole model);
   the adapter logged to the run and, with `register.model_name`, registered as its own model
   version tagged with the base.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.components.finetune.config import TARGET_MODULES, FinetuneConfig, describe
from lmforge.components.finetune.data import DataStats, load_encoder, load_examples, make_rows
from lmforge.components.finetune.task import (
    FinetuneTask,
    build_peft_model,
    data_format,
    load_base,
    matching_modules,
)
from lmforge.components.pretrain import checkpointing
from lmforge.components.pretrain.env import RunEnv
from lmforge.components.pretrain.loop import OnStep, train
from lmforge.components.pretrain.tracking import (
    MlflowTracker,
    flatten,
    plot_loss_curve,
    start_run_tracker,
)
from lmforge.config import to_dict
from lmforge.errors import InputNotFoundError
from lmforge.model.checkpoint import (
    copy_tokenizer_files,
    load_state_dict,
    read_config,
    save_model_dir,
    weights_sha256,
)
from lmforge.model.config import ConfigError, ModelConfig

ADAPTER_ARTIFACT = "adapter"  # where the adapter sits in the MLflow run's artifacts


@dataclass
class FinetuneResult:
    output_dir: Path
    adapter_dir: Path | None  # OUTPUT/adapter (lora / qlora); None for full fine-tuning or a stopped run
    merged_dir: Path | None  # OUTPUT/merged (merge: true, or method: full); else None
    metrics: dict[str, float]  # last logged train/* and val/* values, plus trainable counts
    mlflow_run_id: str | None
    step: int = 0
    preempted: bool = False
    checkpoint_dir: Path | None = None
    data_stats: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    registered_version: str | None = None  # the adapter's registry version (register.model_name)


@dataclass
class Prepared:
    """What preflight found: everything the run needs, checked."""

    cfg: FinetuneConfig
    model_cfg: ModelConfig
    task: FinetuneTask
    base_version: str | None  # registry version of the base, when base_model is a models:/ URI
    stats: dict[str, DataStats]
    trainable: int
    total: int
    chat_template: str | None  # to write into the output tokenizer_config.json (added ChatML)


def finetune(
    cfg: FinetuneConfig, *, resume: str | None = None, verbose: bool = True, on_step: OnStep | None = None
) -> FinetuneResult:
    """Fine-tune as configured. `resume`: None (fresh; refuses an output_dir holding checkpoints),
    "auto" (the newest checkpoint there) or a checkpoint path. `on_step(step, rank)` is called on
    every worker after each optimizer step (tests and benchmarks observe the run with it)."""
    prep = preflight(cfg)
    cfg = prep.cfg
    train_cfg = cfg.to_train_config()
    start = checkpointing.resolve_resume(resume, cfg.checkpoints_dir(), cfg.checkpoint.storage)
    previous = checkpointing.read_state(start) if start is not None else {}
    # LoRA / QLoRA checkpoints hold the adapters, not the frozen base: resume only onto the same base
    base_sha256 = weights_sha256(prep.task.base_dir) if cfg.method != "full" else None
    recorded = previous.get("finetune", {}).get("base_sha256")
    if recorded and base_sha256 and recorded != base_sha256:
        raise checkpointing.CheckpointError(
            f"checkpoint {start} was trained on another base model: the weights of "
            f"{prep.task.base_dir} changed since (sha256 {base_sha256[:12]}..., the checkpoint "
            f"recorded {recorded[:12]}...); resume with the base it was trained on"
        )

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = to_dict(cfg)
    (out / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    stats = {name: s.to_dict() for name, s in prep.stats.items()}
    (out / "data_stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    tracker = start_run_tracker(cfg.tracking, cfg.resolved_run_name, previous)
    if isinstance(tracker, MlflowTracker):
        tracker.client.set_tag(tracker.run_id, "lmforge.stage", "finetune")
        tracker.client.set_tag(tracker.run_id, "lmforge.base_model", prep.task.base_reference)
    info = {
        "config": config_dict,
        "finetune": {
            "base_model": prep.task.base_reference,
            "method": cfg.method,
            "base_sha256": base_sha256,
        },
        "mlflow_run_id": tracker.run_id,
        "mlflow_tracking_uri": tracker.tracking_uri,
    }
    counts = {
        "trainable_params": float(prep.trainable),
        "trainable_pct": 100.0 * prep.trainable / prep.total,
        "total_params": float(prep.total),
    }
    status = "FAILED"
    try:
        tracker.log_params(
            {
                **flatten(config_dict),
                "derived.trainable_params": prep.trainable,
                "derived.total_params": prep.total,
                "derived.trainable_pct": f"{counts['trainable_pct']:.4f}",
                "derived.base_model_dir": prep.task.base_dir,
                **({"derived.base_model_version": prep.base_version} if prep.base_version else {}),
                **{f"data.{split}.{k}": v for split, s in stats.items() for k, v in s.items()},
            }
        )
        tracker.log_metrics({f"model/{k}": v for k, v in counts.items()}, 0)
        tracker.log_artifact(out / "config.yaml")
        tracker.log_artifact(out / "data_stats.json")
        print(
            f"[finetune] {describe(cfg)}; {prep.trainable:,} of {prep.total:,} parameters trainable "
            f"({counts['trainable_pct']:.3f}%); {prep.stats['train'].kept} training examples in "
            f"{prep.stats['train'].rows} rows" + (f"; resuming from {start}" if start else ""),
            flush=True,
        )
        history: list[dict[str, float]] = []
        if cfg.ray.num_workers == 0:
            env = RunEnv(cfg.checkpoints_dir(), cfg.checkpoint.keep_last, start, use_gpu=cfg.ray.use_gpu)
            with env.stop_on_signals():
                result = train(
                    train_cfg, prep.model_cfg, env, tracker, info=info, task=prep.task, on_step=on_step
                )
            checkpoint = Path(result.checkpoint) if result.checkpoint else None
            metrics, preempted, step, history = result.metrics, result.preempted, result.step, result.history
        else:
            from lmforge.components.pretrain.trainer import run_on_ray

            checkpoint, reported = run_on_ray(
                train_cfg,
                prep.model_cfg,
                resume_from=start,
                info=info,
                tracking={"uri": tracker.tracking_uri, "run_id": tracker.run_id},
                verbose=verbose,
                task=prep.task,
                on_step=on_step,
            )
            metrics = {k: float(v) for k, v in reported.items() if "/" in k}
            preempted, step = bool(reported.get("preempted")), int(reported.get("step", 0))

        adapter_dir = merged_dir = None
        if not preempted and checkpoint is not None:
            adapter_dir, merged_dir = export(prep, checkpoint)
        elif preempted:
            print(f"[finetune] stopped at step {step}; continue with --resume auto", flush=True)

        train_curve = tracker.metric_history("train/loss") or _series(history, "train/loss")
        val_curve = tracker.metric_history("val/loss") or _series(history, "val/loss")
        curve = plot_loss_curve(train_curve, val_curve, out / "loss_curve.png", cfg.resolved_run_name)
        if curve is not None:
            tracker.log_artifact(curve)
        version = None
        if adapter_dir is not None:
            tracker.log_artifacts(adapter_dir, ADAPTER_ARTIFACT)
            if cfg.register.model_name and isinstance(tracker, MlflowTracker):
                version = register_adapter(tracker, cfg, prep)
        if merged_dir is not None and cfg.tracking.log_model:
            tracker.log_artifacts(merged_dir, "merged")
        status = "KILLED" if preempted else "FINISHED"
        return FinetuneResult(
            output_dir=out,
            adapter_dir=adapter_dir,
            merged_dir=merged_dir,
            metrics={**metrics, **{f"model/{k}": v for k, v in counts.items()}},
            mlflow_run_id=tracker.run_id,
            step=step,
            preempted=preempted,
            checkpoint_dir=checkpoint,
            data_stats=stats,
            registered_version=version,
        )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def _series(history: list[dict[str, float]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), r[key]) for r in history if key in r]


# ---- preflight ------------------------------------------------------------------------------
def _absolute(p: str | None) -> str | None:
    return str(Path(p).expanduser().resolve()) if p else p


def resolve_base(cfg: FinetuneConfig) -> tuple[str, str, str | None]:
    """(model directory, reference recorded in the adapter, registry version or None)."""
    from lmforge.registry import RegistryClient, is_registry_uri

    if is_registry_uri(cfg.base_model):
        registry = RegistryClient(cfg.tracking.tracking_uri)
        version = registry.resolve(cfg.base_model)
        return str(registry.download(version)), cfg.base_model, version.version
    base = Path(cfg.base_model).expanduser().resolve()
    if not base.is_dir():
        raise InputNotFoundError(
            f"base_model: {cfg.base_model} does not exist (a model directory or models:/...)"
        )
    return str(base), str(base), None


def _check_method(cfg: FinetuneConfig, base_dir: str) -> None:
    hf = json.loads((Path(base_dir) / "config.json").read_text())
    quant = hf.get("quantization_config")
    if cfg.method == "qlora":
        if quant is None:
            raise ConfigError(
                f"method=qlora needs a quantized base (a model directory from `lmforge quantize`, "
                f"int{cfg.qlora.bits}); {base_dir} is not quantized (config.json has no "
                "quantization_config). Quantize it first, or use method=lora"
            )
        bits = _quant_bits(quant)
        if bits is not None and bits != cfg.qlora.bits:
            raise ConfigError(
                f"qlora.bits={cfg.qlora.bits} but the base {base_dir} is quantized to {bits} bits"
            )
    elif quant is not None:
        raise ConfigError(
            f"base_model {base_dir} is quantized; method={cfg.method} trains an fp32 base: use method=qlora "
            "on it, or the unquantized model"
        )


def _quant_bits(quant: dict[str, Any]) -> int | None:
    for group in (quant.get("config_groups") or {}).values():
        bits = (group.get("weights") or {}).get("num_bits")
        if bits is not None:
            return int(bits)
    bits = quant.get("bits")
    return int(bits) if bits is not None else None


def preflight(cfg: FinetuneConfig) -> Prepared:
    """Check everything that needs the filesystem, before Ray starts."""
    cfg = dataclasses.replace(
        cfg,
        output_dir=_absolute(cfg.output_dir) or cfg.output_dir,
        data=dataclasses.replace(
            cfg.data,
            train=_absolute(cfg.data.train) or cfg.data.train,
            validation=_absolute(cfg.data.validation),
            tokenizer_dir=_absolute(cfg.data.tokenizer_dir),
        ),
    )
    base_dir, reference, base_version = resolve_base(cfg)
    try:
        model_cfg = read_config(base_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"base_model: {err}") from None
    _check_method(cfg, base_dir)
    if cfg.max_seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"max_seq_len={cfg.max_seq_len} exceeds the base model's context ({model_cfg.max_seq_len})"
        )
    with torch.device("meta"):
        from lmforge.model.transformer import Transformer

        shape = Transformer(model_cfg)
    total = sum(p.numel() for p in {id(p): p for p in shape.parameters()}.values())
    trainable = total
    if cfg.method != "full":
        targets = matching_modules(shape, cfg.lora.target_modules)
        if not targets:
            raise ConfigError(
                f"lora.target_modules={cfg.lora.target_modules!r} matches no module of the base model; "
                f"valid names: {', '.join(TARGET_MODULES)} (e.g. model.layers.0.self_attn.q_proj)"
            )
        modules = dict(shape.named_modules())
        trainable = sum(cfg.lora.r * (modules[n].in_features + modules[n].out_features) for n in targets)
        total += trainable
    tokenizer_dir = cfg.data.tokenizer_dir or base_dir
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        where = "data.tokenizer_dir" if cfg.data.tokenizer_dir else "base_model"
        raise InputNotFoundError(f"{where}: {tokenizer_dir} has no tokenizer.json")
    enc = load_encoder(tokenizer_dir, model_cfg.eos_token_id, need_chat=cfg.data.format == "chat")
    if enc.tokenizer.get_vocab_size() > model_cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer in {tokenizer_dir} has {enc.tokenizer.get_vocab_size()} tokens, the base model's "
            f"embedding only {model_cfg.vocab_size}"
        )
    stats = {}
    for split, path in (("train", cfg.data.train), ("validation", cfg.data.validation)):
        if path is None:
            continue
        what = f"data.{split}"
        examples, s = load_examples(path, data_format(cfg), enc, cfg.max_seq_len, cfg.overlong, what)
        if not examples:
            raise ConfigError(
                f"{what}: none of the {s.examples} examples is usable "
                f"({s.dropped_overlong} longer than max_seq_len={cfg.max_seq_len}, "
                f"{s.dropped_no_target} with nothing to score)"
            )
        s.rows = len(make_rows(examples, cfg.max_seq_len, cfg.packing, enc.pad_id))
        workers = max(1, cfg.ray.num_workers)
        if s.rows < workers:
            raise ConfigError(f"{what}: {s.rows} row(s) of data cannot give each of {workers} workers one")
        stats[split] = s
    task = FinetuneTask(cfg, base_dir, reference, tokenizer_dir, model_cfg.eos_token_id)
    return Prepared(
        cfg,
        model_cfg,
        task,
        base_version,
        stats,
        trainable,
        total,
        enc.chat_template if enc.chat_template_added else None,
    )


# ---- export ---------------------------------------------------------------------------------
def trained_model(prep: Prepared, checkpoint: Path) -> Any:
    """The model as trained, rebuilt from a checkpoint: a PeftModel (lora / qlora) or a Transformer."""
    from lmforge.components.pretrain.checkpointing import load_weights, read_state

    state = read_state(checkpoint)
    if state["strategy"] != "ddp":  # pragma: no cover - the config allows ddp only
        raise checkpointing.CheckpointError(f"{checkpoint}: cannot export a {state['strategy']} checkpoint")
    base = load_base(prep.task.base_dir, prep.cfg.method)
    if prep.cfg.method == "full":
        load_weights(base, load_state_dict(checkpoint / "model"), where=str(checkpoint))
        return base.eval()
    model = build_peft_model(base, prep.cfg, prep.task.base_reference)
    trainable = checkpoint / checkpointing.TRAINABLE_FILE
    if trainable.is_file():  # the adapters (the frozen base comes from the base model directory)
        checkpointing.load_trainable(model.base_model.model, trainable, where=str(trainable))
    else:  # a checkpoint written before trainable-only checkpoints: the whole model
        load_weights(model.base_model.model, load_state_dict(checkpoint / "model"), where=str(checkpoint))
    return model.eval()


def export(prep: Prepared, checkpoint: Path) -> tuple[Path | None, Path | None]:
    """OUTPUT/adapter and/or OUTPUT/merged from the newest checkpoint."""
    cfg = prep.cfg
    model = trained_model(prep, checkpoint)
    meta = {"base_model": prep.task.base_reference, "checkpoint": str(checkpoint), "method": cfg.method}
    if cfg.method == "full":
        merged = _save_model(model, cfg.merged_dir(), prep, meta)
        print(f"[finetune] model written to {merged}", flush=True)
        return None, merged
    adapter = save_adapter(model, cfg.adapter_dir(), prep.task.tokenizer_dir, prep.chat_template)
    print(f"[finetune] adapter written to {adapter}", flush=True)
    merged = None
    if cfg.merge:
        merged = _save_model(model.merge_and_unload(), cfg.merged_dir(), prep, meta)
        print(f"[finetune] merged model written to {merged}", flush=True)
    return adapter, merged


def _save_model(model: Any, out: Path, prep: Prepared, meta: dict[str, Any]) -> Path:
    path = save_model_dir(
        model, out, tokenizer_dir=prep.task.tokenizer_dir, extra_metadata={"finetune": meta}
    )
    if prep.chat_template:
        from lmforge.components.finetune.data import save_chat_template

        save_chat_template(path, prep.chat_template)
    return path


def save_adapter(
    peft_model: Any, out: Path, tokenizer_dir: str | None, chat_template: str | None = None
) -> Path:
    """peft's save_pretrained into a temp dir beside `out`, tokenizer files added, renamed into place."""
    from lmforge.model.checkpoint import apply_umask_permissions

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # no embedding layers: the vocabulary is the base's (peft would look the base up to compare)
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
            if chat_template:
                from lmforge.components.finetune.data import save_chat_template

                save_chat_template(tmp, chat_template)
        apply_umask_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def register_adapter(tracker: MlflowTracker, cfg: FinetuneConfig, prep: Prepared) -> str:
    """Register the run's adapter artifact as the next version of `register.model_name`, tagged with
    the base model (its registry URI and version when it came from the registry)."""
    from mlflow.exceptions import MlflowException

    assert cfg.register.model_name is not None
    client = tracker.client
    name = cfg.register.model_name
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run = client.get_run(tracker.run_id)
    tags = {
        "lmforge.kind": "lora-adapter",
        "lmforge.method": cfg.method,
        "base_model": prep.task.base_reference,
        **({"base_model_version": prep.base_version} if prep.base_version else {}),
    }
    source = f"{run.info.artifact_uri.rstrip('/')}/{ADAPTER_ARTIFACT}"
    mv = client.create_model_version(name, source=source, run_id=tracker.run_id, tags=tags)
    if cfg.register.alias:
        client.set_registered_model_alias(name, cfg.register.alias, str(mv.version))
    print(f"[finetune] adapter registered as {name} version {mv.version}", flush=True)
    return str(mv.version)


def result_summary(result: FinetuneResult) -> dict[str, Any]:
    """JSON-friendly summary (the CLI prints it)."""
    return {
        "output_dir": str(result.output_dir),
        "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
        "merged_dir": str(result.merged_dir) if result.merged_dir else None,
        "checkpoint_dir": str(result.checkpoint_dir) if result.checkpoint_dir else None,
        "step": result.step,
        "preempted": result.preempted,
        "mlflow_run_id": result.mlflow_run_id,
        "registered_version": result.registered_version,
        **result.metrics,
    }
