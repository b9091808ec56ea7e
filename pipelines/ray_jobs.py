"""Training stages on a remote Ray cluster (KubeRay) through the Ray Jobs API: the `ray job submit`
of a pipeline component.

When $RAY_ADDRESS is a Jobs endpoint (http://HEAD:8265), the pretrain component submits

    python -m lmforge.pipelines.ray_jobs STAGE CONFIG.json RESULT.json

to it, streams the job's logs into the component's log, and fails with the job's own error when
the job fails. The job runs the same stage function `lmforge pretrain` runs, on the cluster's
workers; its output folder must be storage both sides see (a shared volume, or S3 through the
config's storage settings), because the component reads RESULT.json and the model from it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.errors import UserError

FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "LMFORGE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class RayJobFailed(UserError):
    """The Ray job of a pipeline stage ended in FAILED or STOPPED."""


def run_stage_job(
    stage: str,
    config: dict[str, Any],
    work: Path,
    *,
    address: str | None = None,
    client: Any = None,
    log: Callable[[str], None] = lambda text: print(text, end="", flush=True),
) -> str:
    """Submit `stage` with `config` as a Ray job, stream its logs, wait; returns the job id.
    Raises RayJobFailed with the job's status and message."""
    work.mkdir(parents=True, exist_ok=True)
    config_path, result_path = work / f"{stage}-job-config.json", work / "result.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    if client is None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address or os.environ["RAY_ADDRESS"])
    entrypoint = shlex.join(
        ["python", "-m", "lmforge.pipelines.ray_jobs", stage, str(config_path), str(result_path)]
    )
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"lmforge-{stage}-{uuid.uuid4().hex[:8]}",
        runtime_env={"env_vars": env} if env else None,
        metadata={"lmforge.stage": stage},
    )
    log(f"[{stage}] Ray job {job_id} submitted: {entrypoint}\n")

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            log(chunk)

    asyncio.run(tail())
    info = client.get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    if status != "SUCCEEDED":
        raise RayJobFailed(f"{stage}: Ray job {job_id} {status}: {info.message or 'no message'}")
    return job_id


def _main(argv: list[str]) -> int:
    """The job's entry point on the cluster: run the stage, write its summary to RESULT.json."""
    stage, config_path, result_path = argv
    if stage != "pretrain":
        raise SystemExit(f"unknown stage {stage!r}")
    from lmforge.components.pretrain.config import PretrainConfig
    from lmforge.components.pretrain.stage import pretrain
    from lmforge.config import build

    cfg = build(PretrainConfig, json.loads(Path(config_path).read_text(encoding="utf-8")))
    result = pretrain(cfg, resume="auto", verbose=True)
    if result.model_dir is None:
        raise SystemExit(f"pretraining stopped at step {result.step} before it finished")
    summary = {
        "model_dir": str(result.model_dir),
        "mlflow_run_id": result.mlflow_run_id,
        "loss_curve": str(result.loss_curve) if result.loss_curve else None,
        "metrics": {**result.metrics, "steps": result.step},
    }
    Path(result_path).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
