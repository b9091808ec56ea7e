"""What an evaluation leaves on disk: metrics.json, report.md, samples.jsonl and PNG plots.

metrics.json: {"model": ..., "tasks": {TASK: {METRIC: value}}, "baseline": {"model", "tasks"} (with
--baseline), "gate": {"passed", "reasons", "rules"} (with --gate), "cost": ..., "decontamination": ...
(with --train-data), "perplexity_by_length": ...}. report.md shows the same as tables a person reads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_JSON = "metrics.json"
REPORT_MD = "report.md"
SAMPLES_JSONL = "samples.jsonl"
TASKS_PNG = "tasks.png"
PERPLEXITY_PNG = "perplexity_by_length.png"


def write_outputs(out_dir: Path, metrics: dict[str, Any], samples: list[dict[str, Any]]) -> list[Path]:
    """Write every output file; returns their paths (the MLflow run gets them as artifacts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / METRICS_JSON, out_dir / REPORT_MD, out_dir / SAMPLES_JSONL]
    paths[0].write_text(json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    paths[1].write_text(render_report(metrics))
    with paths[2].open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    paths += plot_tasks(out_dir / TASKS_PNG, metrics)
    paths += plot_perplexity_by_length(out_dir / PERPLEXITY_PNG, metrics.get("perplexity_by_length", {}))
    return paths


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def render_report(metrics: dict[str, Any]) -> str:
    base = (metrics.get("baseline") or {}).get("tasks", {})
    lines = [f"# Evaluation of {metrics['model']}", ""]
    if metrics.get("baseline"):
        lines += [f"Baseline: {metrics['baseline']['model']}", ""]
    gate = metrics.get("gate")
    if gate is not None:
        lines += [f"**Gate: {'passed' if gate['passed'] else 'FAILED'}**", ""]
        lines += [f"- {reason}" for reason in gate["reasons"]] or ["- every rule holds"]
        lines.append("")
    lines += ["| task | metric | model | baseline | delta |", "|---|---|---|---|---|"]
    for task, values in metrics["tasks"].items():
        for name, value in values.items():
            b = base.get(task, {}).get(name)
            delta = value - b if isinstance(b, (int, float)) and isinstance(value, (int, float)) else None
            lines.append(f"| {task} | {name} | {_fmt(value)} | {_fmt(b)} | {_fmt(delta)} |")
    cost = metrics.get("cost") or {}
    if cost:
        lines += ["", "## Cost", "", "| task | measure | value |", "|---|---|---|"]
        for task, values in cost.get("tasks", {}).items():
            lines += [f"| {task} | {k} | {_fmt(v)} |" for k, v in values.items()]
        lines += [f"| (all) | {k} | {_fmt(v)} |" for k, v in cost.items() if k != "tasks"]
    contamination = metrics.get("decontamination")
    if contamination:
        lines += ["", f"## Decontamination ({contamination['mode']}, {contamination['ngram']}-grams)", ""]
        lines += ["| task | items | contaminated | share |", "|---|---|---|---|"]
        for task, row in contamination["tasks"].items():
            lines.append(f"| {task} | {row['items']} | {row['contaminated']} | {_fmt(row['share'])} |")
    return "\n".join(lines) + "\n"


def plot_tasks(path: Path, metrics: dict[str, Any]) -> list[Path]:
    """One panel per task: a bar per metric (model, and baseline beside it when given). Perplexity is
    left out (its scale would flatten bits per byte; perplexity_by_length.png shows it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = (metrics.get("baseline") or {}).get("tasks", {})
    shown = {
        task: {k: v for k, v in values.items() if k not in ("items", "tokens", "bytes", "perplexity")}
        for task, values in metrics["tasks"].items()
    }
    shown = {t: v for t, v in shown.items() if v}
    if not shown:
        return []
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.5), squeeze=False)
    for ax, (task, values) in zip(axes[0], shown.items(), strict=True):
        names = list(values)
        xs = range(len(names))
        width = 0.4 if base else 0.8
        ax.bar([x - (width / 2 if base else 0) for x in xs], [values[n] for n in names], width, label="model")
        if task in base:
            ax.bar(
                [x + width / 2 for x in xs],
                [base[task].get(n, float("nan")) for n in names],
                width,
                label="baseline",
            )
        ax.set_xticks(list(xs), names, rotation=30, ha="right")
        ax.set_title(task)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_perplexity_by_length(path: Path, buckets: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """Perplexity per document-length bucket, one line per perplexity task."""
    if not buckets:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task, rows in buckets.items():
        ax.plot([r["bucket"] for r in rows], [r["perplexity"] for r in rows], marker="o", label=task)
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def length_buckets(docs: list[tuple[float, int]]) -> list[dict[str, Any]]:
    """Perplexity over documents grouped by token count in powers of two (1-16, 17-32, ...)."""
    groups: dict[int, list[tuple[float, int]]] = {}
    for nll, tokens in docs:
        upper = max(16, 1 << max(tokens - 1, 1).bit_length())
        groups.setdefault(upper, []).append((nll, tokens))
    rows = []
    for upper in sorted(groups):
        nll = sum(n for n, _ in groups[upper])
        tokens = sum(t for _, t in groups[upper])
        lower = 1 if upper == 16 else upper // 2 + 1
        rows.append(
            {"bucket": f"{lower}-{upper}", "docs": len(groups[upper]), "perplexity": math.exp(nll / tokens)}
        )
    return rows
