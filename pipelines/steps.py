"""What each pipeline component does, as plain functions over paths (`pipelines/components.py` only
unpacks KFP artifacts and calls these, so a test can call them too).

Every function takes the run's resolved config as JSON (`LifecycleConfig`; a component receives only
the sections it reads, so KFP's cache key changes exactly when its config does), writes into the
output paths KFP gave its task, and returns `(metrics, lineage)`: numbers for the task's Metrics
artifact, and the lineage facts (data hash, tokenizer hash, base model, ...) that travel with the
artifacts' metadata down to the registered model version.

Tracking: one MLflow parent run per pipeline run (`start_tracking`, called by the local runner
before the pipeline starts); every stage logs into a run nested under it (`mlflow.parentRunId`): a
run of its own, or the run its stage function already writes (pretraining, evaluation), adopted
with the tag. The parent run reaches the components through the environment
($LMFORGE_MLFLOW_PARENT_RUN), not as a task argument: an argument that changes every run would
defeat KFP's caching of unchanged steps. Without it (a run started from the Kubeflow UI) a stage
finds or opens the parent run of its pipeline run id ($LMFORGE_PIPELINE_RUN_ID or $KFP_RUN_ID), or
logs an unnested run when neither is set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.pipelines.config import LifecycleConfig

EXPERIMENT = "lmforge-pipeline"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under this run id
Result = tuple[dict[str, float], dict[str, str]]  # (metrics, lineage)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---- config and lineage -------------------------------------------------------------------------
def load_config(config_json: str) -> LifecycleConfig:
    """The run's config from the JSON a component received (sections it did not get take defaults)."""
    from lmforge.config import build

    return build(LifecycleConfig, json.loads(config_json))


def sections(cfg: LifecycleConfig | dict[str, Any], *names: str) -> str:
    """JSON of only the named sections: what one component is given."""
    from lmforge.config import to_dict

    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return json.dumps({n: data[n] for n in names if n in data}, sort_keys=True)


def code_version() -> str:
    """lmforge's version, plus the git commit when the code runs from a checkout (or $LMFORGE_GIT_SHA,
    which the project image sets)."""
    from lmforge import __version__

    sha = os.environ.get("LMFORGE_GIT_SHA", "")
    if not sha:
        try:
            sha = subprocess.run(
                ["git", "rev-parse", "--short=12", "HEAD"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    """Lineage facts as MLflow tags (`lineage.data_sha256`, ...)."""
    return {f"lineage.{k}": str(v) for k, v in sorted(lineage.items()) if v not in (None, "")}


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The entries a Metrics artifact or MLflow can hold (numbers; bools as 0/1)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)) and value == value:  # NaN dropped
            out[key] = float(value)
    return out


def log_metrics(metrics_artifact: Any, values: dict[str, Any]) -> None:
    """Put numbers on a KFP Metrics artifact (the Kubeflow UI shows them on the task), and write
    them to its file too: kfp.local's cache treats an output artifact without a file as missing
    and would run the task again every time."""
    for key, value in numeric(values).items():
        metrics_artifact.log_metric(key.replace("/", "_"), value)
    path = Path(metrics_artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metrics_artifact.metadata), sort_keys=True), encoding="utf-8")


SECTIONS = {  # what each component is given of the config
    "curate": ("inputs", "curate"),
    "tokenizer": ("tokenizer",),
    # run_name defaults to register.model_name; the checkpoints live under workdir (see pretrain())
    "pretrain": ("pretrain", "register", "workdir"),
    "finetune": ("finetune",),
    "quantize": ("quantize",),
    "evaluate": ("evaluate", "gate", "register"),
    "register": ("register", "gate"),
}


def resolve(
    config_json: str,
    inputs: str = "",
    base_model: str = "",
    max_steps: int = 0,
    lora_rank: int = 0,
    quantize_method: str = "",
    eval_suite: str = "",
    gate: str = "",
    registry_name: str = "",
) -> dict[str, Any]:
    """The pipeline parameters over the config (a non-empty/non-zero parameter wins), validated as a
    whole before any stage runs; returns each component's sections as JSON (and "config": all).
    `base_model` only switches pretraining off (the pipeline branches on it)."""
    from lmforge.config import apply_overrides, build, to_dict

    data = json.loads(config_json or "{}")
    sets = []
    if inputs:
        listed = json.loads(inputs) if inputs.lstrip().startswith("[") else inputs.split(",")
        data["inputs"] = [str(i).strip() for i in listed if str(i).strip()]
    if max_steps:
        sets.append(f"pretrain.schedule.max_steps={max_steps}")
    if lora_rank:
        sets += ["finetune.enabled=true", f"finetune.lora_rank={lora_rank}"]
    if quantize_method:
        sets.append(f"quantize.method={quantize_method}")
    if eval_suite:
        sets.append(f"evaluate.suite={eval_suite}")
    if gate:
        sets.append(f"gate.rules={gate}")
    if registry_name:
        sets.append(f"register.model_name={registry_name}")
    cfg = build(LifecycleConfig, apply_overrides(data, sets))
    cfg.check_pipeline_sections()
    cfg.pretrain_config()  # the pretraining section validated now, not in the middle of the run
    full = to_dict(cfg)
    out: dict[str, Any] = {name: sections(full, *names) for name, names in SECTIONS.items()}
    out["config"] = json.dumps(full, sort_keys=True)
    return out


# ---- MLflow: one parent run per pipeline run, a nested run per stage ----------------------------
def _client():
    from mlflow import MlflowClient

    from lmforge.tracking import default_tracking_uri

    return MlflowClient(default_tracking_uri())


def start_tracking(config_json: str, pipeline_run_id: str, pipeline_name: str) -> str:
    """Open the pipeline run's MLflow parent run; returns its id. Params: the full resolved config."""
    from lmforge.tracking import default_artifact_root, default_tracking_uri, experiment_id

    client = _client()
    exp = experiment_id(client, EXPERIMENT, default_artifact_root(default_tracking_uri()))
    tags = {"lmforge.pipeline_run_id": pipeline_run_id, "lmforge.code_version": code_version()}
    run = client.create_run(exp, run_name=f"{pipeline_name}-{pipeline_run_id}", tags=tags)
    run_id = run.info.run_id
    for key, value in _flatten(json.loads(config_json)).items():
        client.log_param(run_id, key, value[:6000])
    client.log_text(run_id, json.dumps(json.loads(config_json), indent=2), "config.json")
    return run_id


def finish_tracking(parent_run: str, status: str = "FINISHED") -> None:
    _client().set_terminated(parent_run, status)


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(data) if not isinstance(data, str) else data}


def parent_run_id(client=None) -> str | None:
    """This pipeline run's MLflow parent run (see the module docstring), or None."""
    found = os.environ.get("LMFORGE_MLFLOW_PARENT_RUN")
    if found:
        return found
    pipeline_run = os.environ.get("LMFORGE_PIPELINE_RUN_ID") or os.environ.get("KFP_RUN_ID")
    if not pipeline_run:
        return None
    client = client or _client()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        runs = client.search_runs(
            [exp.experiment_id], f"tags.`lmforge.pipeline_run_id` = '{pipeline_run}'", max_results=1
        )
        if runs:
            return runs[0].info.run_id
    return start_tracking("{}", pipeline_run, "lmforge")


@contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None) -> Iterator[tuple[Any, str]]:
    """A run nested under the pipeline's parent run; FAILED (with the error as a tag) if the body raises."""
    from lmforge.tracking import default_artifact_root, default_tracking_uri, experiment_id

    client = _client()
    parent_run = parent_run_id(client)
    if parent_run:
        parent = client.get_run(parent_run)
        exp, tags = parent.info.experiment_id, {PARENT_TAG: parent_run, **_inherited(parent)}
    else:
        exp = experiment_id(client, EXPERIMENT, default_artifact_root(default_tracking_uri()))
        tags = {"lmforge.code_version": code_version()}
    run = client.create_run(exp, run_name=stage, tags={"lmforge.stage": stage, **tags})
    run_id = run.info.run_id
    for key, value in _flatten(params or {}).items():
        client.log_param(run_id, key, value[:6000])
    try:
        yield client, run_id
    except BaseException as err:
        client.set_tag(run_id, "lmforge.error", f"{type(err).__name__}: {err}"[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def adopt_run(run_id: str | None, stage: str, lineage: dict[str, Any]) -> None:
    """Nest a run a stage function wrote itself under the pipeline's parent run, with lineage tags."""
    client = _client()
    parent_run = parent_run_id(client)
    if not run_id or not parent_run:
        return
    tags = {PARENT_TAG: parent_run, "lmforge.stage": stage, **_inherited(client.get_run(parent_run))}
    for key, value in {**tags, **lineage_tags(lineage)}.items():
        client.set_tag(run_id, key, value)


def _inherited(parent) -> dict[str, str]:
    return {
        k: v for k, v in parent.data.tags.items() if k in ("lmforge.pipeline_run_id", "lmforge.code_version")
    }


def _log_metrics(client, run_id: str, values: dict[str, Any]) -> None:
    for key, value in numeric(values).items():
        client.log_metric(run_id, key, value)


def _tag_lineage(client, run_id: str, lineage: dict[str, Any]) -> None:
    for key, value in lineage_tags(lineage).items():
        client.set_tag(run_id, key, value)


# ---- the stages ---------------------------------------------------------------------------------
def curate(config_json: str, data_dir: str, datacard_md: str) -> Result:
    from lmforge.components.curate.config import public_dict
    from lmforge.components.curate.pipeline import curate as run_curate

    cfg = load_config(config_json)
    with stage_run("curate", {"inputs": cfg.inputs, "curate": public_dict(cfg.curate)}) as (
        client,
        run_id,
    ):
        result = run_curate(cfg.inputs, data_dir, cfg.curate, overwrite=True, progress=False)
        shutil.copyfile(result.datacard_md_path, datacard_md)
        client.log_artifact(run_id, str(result.datacard_md_path), "datacard")
        client.log_artifact(run_id, str(Path(data_dir) / "datacard.json"), "datacard")
        lineage = {"data_sha256": result.datacard["content_sha256"]}
        metrics = result.metrics()
        _log_metrics(client, run_id, metrics)
        _tag_lineage(client, run_id, lineage)
    return numeric(metrics), lineage


def train_tokenizer(
    config_json: str, data_dir: str, tokenizer_dir: str, report_md: str, lineage: dict
) -> Result:
    from lmforge.components.tokenizer import train_tokenizer as run_train
    from lmforge.pipelines.run_record import files_digest

    section = load_config(config_json).tokenizer
    with stage_run("tokenizer", {"tokenizer": section.__dict__}) as (client, run_id):
        result = run_train(
            [Path(data_dir) / "train"],
            tokenizer_dir,
            vocab_size=section.vocab_size,
            min_frequency=section.min_frequency,
            holdout_fraction=section.holdout_fraction,
        )
        shutil.copyfile(result.fertility_md, report_md)
        client.log_artifact(run_id, str(result.fertility_md), "tokenizer")
        lineage = {**lineage, "tokenizer_sha256": files_digest(Path(tokenizer_dir), TOKENIZER_FILES)}
        metrics = result.metrics()
        _log_metrics(client, run_id, metrics)
        _tag_lineage(client, run_id, lineage)
    return numeric(metrics), lineage


def tokenize(data_dir: str, tokenizer_dir: str, shards_dir: str, lineage: dict) -> Result:
    from lmforge.components.tokenize_shards import tokenize_dataset

    with stage_run("tokenize") as (client, run_id):
        result = tokenize_dataset(data_dir, tokenizer_dir, shards_dir, overwrite=True, progress=False)
        metrics = result.metrics()
        _log_metrics(client, run_id, metrics)
        _tag_lineage(client, run_id, lineage)
    return numeric(metrics), lineage


def pretrain(
    config_json: str,
    shards_dir: str,
    model_dir: str,
    loss_png: str,
    lineage: dict,
    *,
    resume: bool | None = None,
    on_step: Any = None,
) -> Result:
    """Pretrain on the shards; the final model is copied into `model_dir` (the Model artifact). With
    $RAY_ADDRESS naming a Ray Jobs endpoint (http://HEAD:8265, a KubeRay cluster) the training runs
    there as a Ray job whose logs stream here; otherwise Ray starts in-process as `lmforge pretrain`
    does.

    The checkpoints stay in a working folder: with an absolute `workdir` in the config (`lmforge
    run` gives one), `<workdir>/pretrain/<key>/`, the key hashing the pretraining section and the
    data and tokenizer hashes, so it outlives this task's artifacts. There a pretraining of the
    same config and data that finished is reused (its model copied, not trained again), and one
    that was interrupted is continued from its newest checkpoint when `resume` is true (None: from
    $LMFORGE_PRETRAIN_RESUME=1, which `lmforge run --resume` sets; an environment variable rather
    than a task argument so the resumed task keeps the cache key of an ordinary one); otherwise
    it stops and says so, rather than discard that work. Without an absolute workdir the folder
    sits beside the model artifact. `on_step(step, rank)` goes to the training loop (tests)."""
    import dataclasses

    cfg = load_config(config_json)
    raw = json.loads(json.dumps(cfg.pretrain))
    work = pretrain_workdir(cfg, lineage) or Path(model_dir).parent / "pretrain-work"
    raw["output_dir"] = str(work)
    tracking = raw.setdefault("tracking", {})
    if isinstance(tracking, dict):  # the training run beside its pipeline run (the UI nests it there)
        tracking["experiment"] = EXPERIMENT
    raw.setdefault("data", {})["shards_dir"] = shards_dir
    pcfg = dataclasses.replace(cfg, pretrain=raw).pretrain_config()
    from lmforge.config import to_dict

    if resume is None:
        resume = os.environ.get("LMFORGE_PRETRAIN_RESUME", "") == "1"
    lineage = {**lineage, "base_model": "none (pretrained from scratch)"}
    summary_file = work / "result.json"
    if os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        from lmforge.pipelines.ray_jobs import run_stage_job

        run_stage_job("pretrain", to_dict(pcfg), work)
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    elif _finished(summary_file):
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        print(f"[pretrain] this config and data were trained before in {work}: reusing its model", flush=True)
        with stage_run("pretrain", {"reused_from": str(work)}) as (client, run_id):
            client.set_tag(run_id, "lmforge.reused_run", str(summary.get("mlflow_run_id") or ""))
            _log_metrics(client, run_id, summary.get("metrics", {}))
            _tag_lineage(client, run_id, lineage)
        summary["mlflow_run_id"] = None  # already nested under the pipeline run that trained it
    else:
        from lmforge.components.pretrain.stage import pretrain as run_pretrain

        result = run_pretrain(pcfg, resume=_resume_spec(pcfg, resume), on_step=on_step, verbose=False)
        if result.model_dir is None:
            raise UserError(
                f"pretraining stopped at step {result.step} before it finished (checkpoint "
                f"{result.checkpoint_dir}); run again with --resume to continue it"
            )
        summary = {
            "model_dir": str(result.model_dir),
            "mlflow_run_id": result.mlflow_run_id,
            "loss_curve": str(result.loss_curve) if result.loss_curve else None,
            "metrics": {**result.metrics, "steps": result.step},
        }
        from lmforge.pipelines.run_record import write_json_atomic

        write_json_atomic(summary_file, summary)
    final, run_id, curve = Path(summary["model_dir"]), summary.get("mlflow_run_id"), summary.get("loss_curve")
    shutil.copytree(final, model_dir, dirs_exist_ok=True)
    if curve and Path(curve).is_file():
        shutil.copyfile(curve, loss_png)
    adopt_run(run_id, "pretrain", lineage)
    return numeric(summary.get("metrics", {})), lineage


def pretrain_workdir(cfg: LifecycleConfig, lineage: dict) -> Path | None:
    """`<workdir>/pretrain/<key>`: where the pretraining of this config and data keeps its
    checkpoints across pipeline runs; None without an absolute workdir or the data hashes."""
    data, tokenizer = lineage.get("data_sha256"), lineage.get("tokenizer_sha256")
    if not cfg.workdir or not Path(cfg.workdir).is_absolute() or not data or not tokenizer:
        return None
    import hashlib

    identity = {"pretrain": cfg.pretrain, "run_name": cfg.register.model_name, "data": data, "tok": tokenizer}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.workdir) / "pretrain" / key


def _finished(summary_file: Path) -> bool:
    """A pretraining in this folder finished and its model is still there."""
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        return (Path(summary["model_dir"]) / "config.json").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _resume_spec(pcfg: Any, resume: bool) -> str | None:
    """Continue the checkpoints in the working folder ("auto") or start afresh (None); refuses to
    start afresh over an interrupted pretraining of the same config and data."""
    from lmforge.components.pretrain.checkpointing import find_latest

    if pcfg.checkpoint.storage:  # checkpoints on S3: the stage looks for them there
        return "auto" if resume else None
    latest = find_latest(pcfg.checkpoints_dir())
    if latest is None:
        if resume:
            print("[pretrain] --resume: no checkpoint of this config and data yet; training from the start")
        return None
    if resume:
        print(f"[pretrain] resuming from {latest}", flush=True)
        return "auto"
    raise UserError(
        f"the pretraining of this config and data in {pcfg.output_dir} did not finish (newest checkpoint: "
        f"{latest.name}); run again with --resume to continue it, or --overwrite to start afresh"
    )


def import_model(base_model: str, model_dir: str, lineage: dict) -> Result:
    """The base model given instead of pretraining: a model directory or a models:/NAME@ALIAS URI."""
    from lmforge.registry import RegistryClient, is_registry_uri

    with stage_run("import-base-model", {"base_model": base_model}) as (client, run_id):
        if is_registry_uri(base_model):
            registry = RegistryClient()
            source = registry.download(registry.resolve(base_model))
        else:
            source = Path(base_model)
        if not (source / "config.json").is_file():
            raise UserError(f"base_model {base_model} is not a model directory (config.json missing)")
        shutil.copytree(source, model_dir, dirs_exist_ok=True)
        lineage = {**lineage, "base_model": base_model}
        _tag_lineage(client, run_id, lineage)
    return {}, lineage


def finetune(config_json: str, model_dir: str, out_dir: str, lineage: dict) -> Result:
    """LoRA fine-tuning of `model_dir` (`lmforge finetune`); the merged model goes to `out_dir`."""
    section = load_config(config_json).finetune
    if not section.enabled:
        return _pass_through(model_dir, out_dir, "finetune"), lineage
    from lmforge.components.finetune.config import load_finetune_config
    from lmforge.components.finetune.stage import finetune as run_finetune

    overrides = [
        f"base_model={model_dir}",
        f"output_dir={Path(out_dir).parent / 'finetune-work'}",
        "merge=true",
        f"tracking.experiment={EXPERIMENT}",  # beside its pipeline run, as pretraining (the UI nests it)
    ]
    if section.lora_rank:
        overrides.append(f"lora.r={section.lora_rank}")
    ft_cfg = load_finetune_config(section.config, [*section.overrides, *overrides])
    result = run_finetune(ft_cfg, resume=None, verbose=False)
    shutil.copytree(result.merged_dir or result.output_dir, out_dir, dirs_exist_ok=True)
    lineage = {**lineage, "finetune": "lora" + (f"-r{section.lora_rank}" if section.lora_rank else "")}
    adopt_run(result.mlflow_run_id, "finetune", lineage)
    return numeric(result.metrics), lineage


def quantize(
    config_json: str, model_dir: str, out_dir: str, lineage: dict, data_dir: str | None = None
) -> Result:
    """Quantize `model_dir` into `out_dir` (`lmforge quantize`), calibrated on the curated train split
    `<data_dir>/train` (int4-awq / int4-gptq need it; the other methods report the loss on it before
    and after); the model passes through unchanged when quantize.method is empty."""
    section = load_config(config_json).quantize
    if not section.method:
        return _pass_through(model_dir, out_dir, "quantize"), lineage
    from lmforge.components.quantize.stage import quantize as run_quantize

    calibration = Path(data_dir) / "train" if data_dir else None
    sizes = {k: getattr(section, k) for k in ("num_sequences", "seq_len", "min_sequences")}
    with stage_run("quantize", {"quantize": section.__dict__}) as (client, run_id):
        result = run_quantize(
            model_dir,
            out_dir,
            method=section.method,
            group_size=section.group_size,
            calibration=calibration,
            **{k: v for k, v in sizes.items() if v is not None},
        )
        lineage = {**lineage, "quantization": section.method}
        metrics = numeric(result.report if isinstance(result.report, dict) else {})
        _log_metrics(client, run_id, metrics)
        _tag_lineage(client, run_id, lineage)
    return metrics, lineage


def _pass_through(model_dir: str, out_dir: str, stage: str) -> dict[str, float]:
    """A stage switched off: its output is its input (hard links where the filesystem allows)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(model_dir, out_dir, copy_function=link, dirs_exist_ok=True)
    print(f"[{stage}] switched off in the config: passing the model through unchanged", flush=True)
    return {}


def evaluate(
    config_json: str, model_dir: str, data_dir: str, out_dir: str, report_md: str, lineage: dict
) -> tuple[dict[str, float], dict[str, str], bool]:
    """The evaluation suite on the final model, judged by the gate against the current holder of
    `gate.promote_alias` (when there is one). Returns (metrics, lineage, gate passed); without a
    suite or without a gate nothing passes (nothing gets promoted)."""
    from lmforge.components.evaluate.stage import evaluate as run_evaluate
    from lmforge.components.evaluate.stage import flat_metrics
    from lmforge.registry import RegistryClient

    cfg = load_config(config_json)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if not cfg.evaluate.suite:
        Path(report_md).write_text(
            "# Evaluation\n\nNo evaluation suite configured (evaluate.suite): nothing promoted.\n"
        )
        return {}, lineage, False
    champion = f"models:/{cfg.register.model_name}@{cfg.gate.promote_alias}"
    baseline = (
        champion if cfg.gate.promote_alias in _aliases(RegistryClient(), cfg.register.model_name) else None
    )
    gate = _gate_file(cfg.gate.rules, baseline is not None, Path(out_dir)) if cfg.gate.rules else None
    result = run_evaluate(
        model_dir,
        cfg.evaluate.suite,
        out_dir,
        baseline=baseline,
        gate=gate,
        limit=cfg.evaluate.limit,
        batch_size=cfg.evaluate.batch_size,
        train_data=str(Path(data_dir) / "train"),
        parent_run=parent_run_id(),  # nested under the pipeline's run, in its experiment
    )
    shutil.copyfile(Path(out_dir) / "report.md", report_md)
    passed = bool(result.gate_passed)
    lineage = {**lineage, "gate_passed": str(passed).lower() if gate else "no-gate"}
    adopt_run(result.run_id, "evaluate", lineage)
    return {**flat_metrics(result.metrics), "gate_passed": float(passed)}, lineage, passed


def _aliases(registry, name: str) -> dict[str, str]:
    try:
        return registry.aliases(name)
    except UserError:  # no such registered model yet
        return {}


def _gate_file(rules: str, with_baseline: bool, out_dir: Path) -> str:
    """The gate file as given, or (no baseline yet: the first run) a copy without `max_regression` rules."""
    if with_baseline:
        return rules
    from lmforge.config import read_yaml

    data = read_yaml(rules)
    kept = [r for r in data.get("rules", []) if "max_regression" not in r]
    path = out_dir / "gate-first-run.yaml"
    import yaml

    path.write_text(yaml.safe_dump({**data, "rules": kept}, sort_keys=False))
    return str(path)


def register(config_json: str, model_dir: str, lineage: dict, metrics: dict) -> tuple[str, dict[str, str]]:
    """Register the final model as the next version, alias `register.alias`, with the lineage (and
    the evaluation's gate result and key metrics) as version tags. Returns (version, lineage)."""
    from lmforge.registry import RegistryClient

    cfg = load_config(config_json)
    parent_run = parent_run_id()
    pipeline_run = os.environ.get("LMFORGE_PIPELINE_RUN_ID") or os.environ.get("KFP_RUN_ID", "")
    registry_lineage = {  # the registry's own lineage keys (lmforge.registry.LINEAGE_KEYS)
        "data_hash": lineage.get("data_sha256"),
        "tokenizer_hash": lineage.get("tokenizer_sha256"),
        "base_model": lineage.get("base_model"),
        "code_version": code_version(),
        "pipeline_run_id": pipeline_run or None,
    }
    gate = {"true": True, "false": False}.get(str(lineage.get("gate_passed")))  # None: no gate
    tags = {
        **lineage_tags(lineage),
        "lmforge.pipeline_run_id": pipeline_run,
        "lmforge.code_version": code_version(),
        "lmforge.parent_run_id": parent_run or "",
        **{f"metric.{k}": f"{v:g}" for k, v in sorted(numeric(metrics).items())[:50]},
    }
    with stage_run("register", {"register": cfg.register.__dict__}) as (client, run_id):
        version = RegistryClient().register_model_dir(
            model_dir,
            cfg.register.model_name,
            alias=cfg.register.alias,
            tags=tags,
            lineage=registry_lineage,
            gate=gate,
        )
        client.set_tag(run_id, "lmforge.registered", f"models:/{cfg.register.model_name}/{version.version}")
        _tag_lineage(client, run_id, lineage)
    if parent_run:
        client.set_tag(parent_run, "lmforge.registered_version", str(version.version))
    return str(version.version), lineage


def promote(config_json: str, version: str) -> str:
    """Move `gate.promote_alias` to `version` (the pipeline calls it only when the gate passed; the
    registry refuses a version whose gate failed all the same)."""
    from lmforge.registry import RegistryClient

    cfg = load_config(config_json)
    registry = RegistryClient()
    with stage_run("promote", {"version": version, "alias": cfg.gate.promote_alias}) as (client, run_id):
        move = registry.promote(cfg.register.model_name, version, cfg.gate.promote_alias)
        client.set_tag(run_id, "lmforge.previous", str(move.previous))
    uri = f"models:/{cfg.register.model_name}@{cfg.gate.promote_alias}"
    client.set_tag(run_id, "lmforge.promoted", f"{uri} = version {version}")
    return uri


def deploy(model_uri: str, version: str, note_md: str) -> None:
    """Check the promoted alias resolves to this version, and say how it is served: a serving
    deployment (`lmforge serve --model URI`, or the Helm chart's RayService) follows the alias and
    picks the new version up at its next poll."""
    from lmforge.registry import RegistryClient

    with stage_run("deploy", {"model": model_uri}):
        resolved = RegistryClient().resolve(model_uri)
        if resolved.version != version:
            raise UserError(f"{model_uri} names version {resolved.version}, not the promoted {version}")
        Path(note_md).write_text(
            f"# Deployed\n\n`{model_uri}` = version {version}.\n\n"
            f"Serve it locally: `lmforge serve --model {model_uri}`; a RayService following the alias "
            "picks it up at its next poll.\n",
            encoding="utf-8",
        )
