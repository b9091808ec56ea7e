"""What running the lifecycle as the Kubeflow pipeline through kfp.local costs over the in-process run.

Baseline: `lmforge run` in-process (`pipelines/lifecycle.py`: curate -> tokenizer -> tokenize ->
pretrain -> register -> generate, one Python process). lmforge: `lmforge run --kfp`
(`pipelines/local.py`: the same stages as kfp.local tasks, each a fresh subprocess, plus the
pass-through finetune/quantize tasks, an evaluation and MLflow nesting). Both on the same tiny config
(a slice of the sample corpus, the `tiny` preset, a few steps, no Ray workers), each in a fresh
workdir and MLflow store; then the kfp run again unchanged (cache reuse). Prints one JSON line.

    .venv/bin/python benchmarks/pipeline_overhead.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def config(work: Path, steps: int):
    from lmforge.config import load
    from lmforge.pipelines.config import LifecycleConfig

    overrides = [
        f"workdir={work}",
        f"inputs=[{REPO / 'data/sample/python-docs/tutorial'}]",
        "tokenizer.vocab_size=600",
        "curate.split.validation=0.25",
        "pretrain.model.preset=tiny",
        "pretrain.data.seq_len=64",
        "pretrain.data.global_batch_size=4",
        "pretrain.data.micro_batch_size=4",
        f"pretrain.schedule.max_steps={steps}",
        "pretrain.schedule.warmup_steps=1",
        f"pretrain.checkpoint.every={steps}",
        "pretrain.eval.every=0",
        "pretrain.ray.num_workers=0",
        "generate.max_new_tokens=8",
        "evaluate.suite=null",
        "gate.rules=null",
    ]
    return load(LifecycleConfig, REPO / "configs/demo.yaml", overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    from lmforge.pipelines.lifecycle import run_lifecycle
    from lmforge.pipelines.local import run_pipeline_locally

    with tempfile.TemporaryDirectory(prefix="lmf-pipe-bench-") as tmp:
        tmp_path = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'a.db'}"
        start = time.perf_counter()
        run_lifecycle(config(tmp_path / "a", args.steps), log=lambda _: None)
        in_process = time.perf_counter() - start

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'b.db'}"
        start = time.perf_counter()
        run_pipeline_locally(config(tmp_path / "b", args.steps), log=lambda _: None)
        kfp_local = time.perf_counter() - start
        start = time.perf_counter()
        again = run_pipeline_locally(config(tmp_path / "b", args.steps), log=lambda _: None)
        kfp_again = time.perf_counter() - start
    print(
        json.dumps(
            {
                "figure": "lmforge run: in-process vs kfp.local pipeline (tiny config)",
                "in_process_s": round(in_process, 1),
                "kfp_local_s": round(kfp_local, 1),
                "ratio_kfp_over_in_process": round(kfp_local / in_process, 2),
                "kfp_local_rerun_s": round(kfp_again, 1),
                "rerun_reused": sum(s["status"] == "reused" for s in again.steps.values()),
                "load_average": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
