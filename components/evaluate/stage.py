"""The evaluate stage: a model (and optionally a baseline) over a task suite -> report, MLflow run, gate.

    result = evaluate("out/model", "configs/eval-demo.yaml", "out/eval",
                      baseline="models:/lmforge-demo@champion", gate="configs/gate-demo.yaml")
    result.gate_passed  # None without a gate (the demo gate's max_regression rules need the baseline)

Order of work, so that bad input costs nothing: the suite (every item) and the gate are checked, the
device and the model directories (config.json, tokenizer) are checked, then the training split is
indexed for decontamination, and only then are weights loaded. The model and the baseline are
evaluated one after the other (one in memory at a time) on exactly the same items.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.components.evaluate.gate import apply_gate, load_gate
from lmforge.components.evaluate.report import length_buckets, write_outputs
from lmforge.components.evaluate.suite import Suite, Task, load_suite
from lmforge.errors import InputNotFoundError, UserError

EXPERIMENT = "lmforge-evaluate"


@dataclass
class EvalResult:
    output_dir: Path
    metrics: dict[str, Any]
    gate_passed: bool | None  # None: no gate was given
    run_id: str | None  # the MLflow run


@dataclass
class ModelSource:
    """A model to evaluate: a local directory, or a registered version downloaded to one."""

    label: str  # what the report calls it: the path, or `models:/bot@champion (bot/3)`
    path: Path
    registered: Any = None  # lmforge.registry.ResolvedVersion for a models:/ URI


def evaluate(
    model: str,
    suite: str | os.PathLike,
    output: str | os.PathLike,
    *,
    baseline: str | None = None,
    gate: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    train_data: str | None = None,
    device: str = "cpu",
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
    parent_run: str | None = None,
) -> EvalResult:
    """Run `suite` on `model` (and `baseline`), judge `gate`, write the report into `output` and log
    an MLflow run: in the `lmforge-evaluate` experiment, or nested under `parent_run` (a pipeline
    run's parent run: same experiment, `mlflow.parentRunId` tag)."""
    from lmforge.devices import check_device
    from lmforge.registry import RegistryClient

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    loaded = load_suite(suite, overrides, limit)
    gate_cfg = (
        load_gate(gate, {t.name: t.config.metric_keys for t in loaded.tasks}, baseline is not None)
        if gate
        else None
    )
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output {output} exists and is not a directory")
    torch_device = check_device(device)
    registry = RegistryClient(tracking_uri)
    source = resolve_model(model, registry, "--model")
    base_source = resolve_model(baseline, registry, "--baseline") if baseline else None

    contamination = None
    if train_data:
        contamination = decontaminate(loaded, train_data)

    metrics: dict[str, Any] = {"model": source.label, "suite": str(suite), "tasks": {}}
    outcome, samples = run_suite(source.path, loaded, batch_size, str(torch_device))
    metrics["tasks"], metrics["cost"] = outcome["tasks"], outcome["cost"]
    if outcome["perplexity_by_length"]:
        metrics["perplexity_by_length"] = outcome["perplexity_by_length"]
    if base_source is not None:
        base, _ = run_suite(base_source.path, loaded, batch_size, str(torch_device))
        metrics["baseline"] = {"model": base_source.label, "tasks": base["tasks"]}
    if contamination is not None:
        metrics["decontamination"] = contamination
    if gate_cfg is not None:
        metrics["gate"] = apply_gate(
            gate_cfg, metrics["tasks"], metrics["baseline"]["tasks"] if base_source else None
        )
    files = write_outputs(out_dir, metrics, samples)
    run_id = log_to_mlflow(
        registry, metrics, files, source, base_source, suite, limit, batch_size, device, parent_run=parent_run
    )
    gate_passed = metrics["gate"]["passed"] if gate_cfg is not None else None
    return EvalResult(out_dir, metrics, gate_passed, run_id)


# ---- models -----------------------------------------------------------------------------------
def resolve_model(spec: str, registry, flag: str) -> ModelSource:
    """A local model directory (checked: config.json and a tokenizer), downloading a models:/ URI."""
    from lmforge.registry import is_registry_uri
    from lmforge.tokenizer_files import load_tokenizer

    if is_registry_uri(spec):
        version = registry.resolve(spec)
        path = registry.download(version)
        source = ModelSource(f"{spec} ({version.label})", path, version)
    else:
        path = Path(spec)
        if not path.is_dir():
            raise InputNotFoundError(
                f"{flag} {spec} is not a directory (a model directory or models:/NAME@ALIAS)"
            )
        source = ModelSource(str(spec), path)
    if not (source.path / "config.json").is_file():
        raise UserError(f"{flag} {spec} is not a model directory: config.json is missing")
    try:
        load_tokenizer(source.path)
    except UserError as err:
        raise UserError(f"{flag} {spec}: {err}") from None
    return source


def run_suite(
    model_dir: Path, suite: Suite, batch_size: int, device: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load the model, run every task; ({"tasks", "cost", "perplexity_by_length"}, samples)."""
    import torch

    from lmforge.components.evaluate.tasks import run_task
    from lmforge.model.checkpoint import load_model_dir
    from lmforge.serving.textgen import model_tokenizer

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    model = load_model_dir(model_dir, device=device).eval()
    tokenizer = model_tokenizer(model_dir, model.config.vocab_size)
    tasks, cost, buckets, samples = {}, {}, {}, []
    for task in suite.tasks:
        outcome = run_task(model, tokenizer, task, suite.config, batch_size)
        tasks[task.name] = outcome.metrics
        cost[task.name] = outcome.cost
        samples += outcome.samples
        if outcome.documents:
            buckets[task.name] = length_buckets(outcome.documents)
    del model
    gc.collect()
    return {
        "tasks": tasks,
        "cost": {"tasks": cost, **peak_memory(device)},
        "perplexity_by_length": buckets,
    }, samples


def peak_memory(device: str) -> dict[str, Any]:
    """Peak accelerator memory allocated by torch on a GPU; the process's peak resident set on a CPU."""
    import torch

    if device.startswith("cuda"):
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_of": "cuda"}
    from lmforge.memory import peak_resident_gb

    return {"peak_memory_mb": peak_resident_gb() * 1e9 / 2**20, "peak_memory_of": "process resident set"}


# ---- decontamination --------------------------------------------------------------------------
def item_text(task: Task, item: dict[str, Any]) -> str:
    """What of an item could have leaked into training: the document, or prompt + reference answer."""
    from lmforge.components.evaluate.suite import render_prompt

    cfg = task.config
    if cfg.type == "perplexity":
        return item[cfg.text]
    assert cfg.prompt is not None
    prompt = render_prompt(cfg.prompt, item)
    if cfg.type == "generate":
        return f"{prompt} {item[cfg.target]}"
    return f"{prompt} {item[cfg.choices][item[cfg.answer]]}"


def decontaminate(suite: Suite, train_data: str) -> dict[str, Any]:
    """Overlap of every task's items with the training split; with `decontaminate: filter` the
    contaminated items are removed from the suite before scoring (a task left empty is an error)."""
    from lmforge.components.evaluate.decontaminate import NgramIndex, decontamination_report

    cfg = suite.config
    index = NgramIndex.from_dataset(train_data, n=cfg.ngram)
    threshold = cfg.contamination_threshold or sys.float_info.min  # None: any shared n-gram
    texts = {t.name: [item_text(t, item) for item in t.items] for t in suite.tasks}
    report = decontamination_report(texts, index, threshold)
    if cfg.decontaminate == "filter":
        for task in suite.tasks:
            keep = [not index.contaminated(text, threshold) for text in texts[task.name]]
            if not any(keep):
                raise UserError(
                    f"task {task.name!r}: every item is contaminated by {train_data}; nothing left"
                )
            task.items = [i for i, k in zip(task.items, keep, strict=True) if k]
            task.origins = [o for o, k in zip(task.origins, keep, strict=True) if k]
    return {"mode": cfg.decontaminate, "ngram": cfg.ngram, "train_data": str(train_data), "tasks": report}


# ---- MLflow -----------------------------------------------------------------------------------
def log_to_mlflow(
    registry,
    metrics: dict[str, Any],
    files: list[Path],
    source: ModelSource,
    base_source: ModelSource | None,
    suite: str | os.PathLike,
    limit: int | None,
    batch_size: int,
    device: str,
    parent_run: str | None = None,
) -> str:
    """One run in the `lmforge-evaluate` experiment (or nested under `parent_run`, in its experiment):
    params, every metric as TASK.METRIC, the files as artifacts, tag gate=passed|failed; a registered
    model version gets the verdict as tags too."""
    from lmforge.tracking import experiment_id

    client = registry.client
    gate = metrics.get("gate")
    tags = {"model": source.label}
    if gate is not None:
        tags["gate"] = "passed" if gate["passed"] else "failed"
    if parent_run:
        experiment = client.get_run(parent_run).info.experiment_id
        tags["mlflow.parentRunId"] = parent_run
    else:
        experiment = experiment_id(client, EXPERIMENT, registry.artifact_root)
    run = client.create_run(experiment, run_name="evaluate" if parent_run else None, tags=tags)
    run_id = run.info.run_id
    try:
        params = {
            "model": source.label,
            "baseline": base_source.label if base_source else "",
            "suite": str(suite),
            "limit": str(limit) if limit is not None else "",
            "batch_size": str(batch_size),
            "device": device,
        }
        for key, value in params.items():
            client.log_param(run_id, key, value)
        values = flat_metrics(metrics)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, 0) for k, v in values.items()]
        for i in range(0, len(batch), 500):
            client.log_batch(run_id, metrics=batch[i : i + 500])
        for path in files:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    if source.registered is not None:
        version = source.registered
        version_tags = {"eval_run_id": run_id, **{f"eval.{k}": f"{v:.6g}" for k, v in values.items()}}
        if gate is not None:
            version_tags["gate"] = tags["gate"]
        for key, value in version_tags.items():
            client.set_model_version_tag(version.name, version.version, key, value)
    return run_id


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """TASK.METRIC (and baseline.TASK.METRIC, cost.TASK.MEASURE) -> value, for MLflow."""
    out = {f"{t}.{k}": float(v) for t, vals in metrics["tasks"].items() for k, v in vals.items()}
    for t, vals in (metrics.get("baseline") or {}).get("tasks", {}).items():
        out.update({f"baseline.{t}.{k}": float(v) for k, v in vals.items()})
    cost = metrics.get("cost", {})
    for t, vals in cost.get("tasks", {}).items():
        out.update({f"cost.{t}.{k}": float(v) for k, v in vals.items()})
    if "peak_memory_mb" in cost:
        out["cost.peak_memory_mb"] = float(cost["peak_memory_mb"])
    if metrics.get("gate") is not None:
        out["gate_passed"] = float(metrics["gate"]["passed"])
    return out
