"""Experiment tracking (MLflow) and console progress for the training loop.

The loop talks to a `Tracker`; the base class is a do-nothing stand-in, so the loop never asks
"is logging on?" — ranks other than 0, and runs with `tracking.enabled: false`, just get the
stand-in. `MlflowTracker` uses `MlflowClient` with an explicit run id (no global "active run"), so
the same run can be created by the driver, written to by the rank-0 worker in another process,
and continued by a resumed run.

Default store: `sqlite:///<cwd>/.lmforge/mlflow.db` with artifacts in `<cwd>/.lmforge/mlartifacts`,
unless `tracking.tracking_uri` or `$MLFLOW_TRACKING_URI` names another (e.g. an MLflow server).
Kept self-contained so it can move to `lmforge/tracking.py` when other stages need it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from lmforge.tracking import default_artifact_root, experiment_id


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4} (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """The stand-in: accepts everything, records nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return []

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(Tracker):
    """One MLflow run, addressed by id."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = MlflowClient(tracking_uri)

    @classmethod
    def start(
        cls, tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None
    ) -> MlflowTracker:
        """Create a run (or reopen `run_id`, when resuming) in `experiment`."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        if run_id is not None:
            try:
                client.get_run(run_id)
            except Exception:  # the run is gone (another tracking store): start a new one
                run_id = None
            else:
                client.update_run(run_id, status="RUNNING")
                return cls(tracking_uri, run_id)
        exp_id = experiment_id(client, experiment, default_artifact_root(tracking_uri))
        run = client.create_run(exp_id, run_name=run_name, tags={"lmforge.stage": "pretrain"})
        return cls(tracking_uri, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params not logged yet (a resumed run keeps its original values; MLflow params are
        immutable). Changed values are recorded as `resumed.<key>` so nothing is lost silently."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = []
        for key, value in params.items():
            text = str(value)[:6000]
            if key not in existing:
                new.append(Param(key, text))
            elif existing[key] != text and f"resumed.{key}" not in existing:
                new.append(Param(f"resumed.{key}", text))
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        rows = self.client.get_metric_history(self.run_id, key)
        latest: dict[int, float] = {}
        for m in sorted(
            rows, key=lambda m: m.timestamp
        ):  # a step re-run after a restart: keep the last value
            latest[m.step] = m.value
        return sorted(latest.items())

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def start_run_tracker(tracking: Any, run_name: str, previous: dict[str, Any]) -> Tracker:
    """The driver's tracker for a training run (`tracking`: a config's TrackingSection): a no-op when
    tracking is off; otherwise an MLflow run in `tracking.experiment`, reopening the run of the attempt
    being resumed (`previous`: its trainer state) when that run lives in the same store, so a resumed
    run keeps one MLflow run."""
    if not tracking.enabled:
        return Tracker()
    from lmforge.tracking import default_tracking_uri

    uri = tracking.tracking_uri or default_tracking_uri()
    same_store = previous.get("mlflow_tracking_uri") == uri
    return MlflowTracker.start(
        uri,
        tracking.experiment,
        run_name,
        run_id=previous.get("mlflow_run_id") if same_store else None,
    )


def open_tracker(enabled: bool, tracking_uri: str | None, run_id: str | None) -> Tracker:
    """The tracker a worker logs to: the driver's MLflow run, or the stand-in."""
    if not enabled or tracking_uri is None or run_id is None:
        return Tracker()
    return MlflowTracker(tracking_uri, run_id)


def plot_loss_curve(
    train: list[tuple[int, float]], val: list[tuple[int, float]], path: str | os.PathLike, run_name: str
) -> Path | None:
    """Training (and validation) loss against optimizer step, as a PNG titled with the run's name."""
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2)
    if val:
        ax.plot(
            [s for s, _ in val],
            [v for _, v in val],
            "o-",
            label="validation loss",
            linewidth=1.2,
            markersize=3,
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    title = f"Loss of pretraining run '{run_name}'"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, metadata={"Title": title})  # also in the PNG's text chunk, for tools and tests
    plt.close(fig)
    return path


# ---- console ------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ConsoleProgress:
    """One line per logged step: progress, loss, lr, grad norm, throughput, MFU, memory, ETA.

    Plain lines (not a redrawn bar) because the loop often runs inside Ray workers or a pod whose
    output is a log, not a terminal."""

    def __init__(self, total_steps: int, start_step: int, stream: IO[str] | None = None) -> None:
        self.total, self.start_step = total_steps, start_step
        self.stream = stream or sys.stdout
        self.t0 = time.perf_counter()

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return math.inf
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def update(self, step: int, m: dict[str, float]) -> str:
        parts = [f"step {step}/{self.total} ({100 * step / self.total:.1f}%)"]
        if "train/loss" in m:
            parts.append(f"loss {m['train/loss']:.4f}")
        if "val/loss" in m:
            parts.append(f"val {m['val/loss']:.4f} (ppl {m['val/ppl']:.1f})")
        if "train/lr" in m:
            parts.append(f"lr {m['train/lr']:.2e}")
        if "train/grad_norm" in m:
            parts.append(f"gnorm {m['train/grad_norm']:.3f}")
        if m.get("train/loss_scale", 1.0) != 1.0:
            parts.append(f"scale {m['train/loss_scale']:.0f}")
        if "train/tokens_per_s" in m:
            parts.append(f"{m['train/tokens_per_s'] / 1e3:.1f}k tok/s")
        if "train/mfu" in m:
            parts.append(f"mfu {100 * m['train/mfu']:.1f}%")
        if "train/peak_mem_gb" in m:
            parts.append(f"mem {m['train/peak_mem_gb']:.2f} GB")
        parts.append(f"eta {_duration(self.eta_seconds(step))}")
        line = "[pretrain] " + " | ".join(parts)
        print(line, file=self.stream, flush=True)
        return line
