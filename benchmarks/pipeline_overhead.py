"""What running the stages as the Kubeflow pipeline through kfp.local (`lmforge run`) costs over
calling the same stage functions in one process.

Baseline: the pipeline's stage functions (`pipelines/steps.py`: curate -> train_tokenizer ->
tokenize -> pretrain -> register, what each component calls) called in sequence in this Python
process, with the same MLflow nesting. lmforge: `lmforge run` (`pipelines/local.py`: the same
functions as kfp.local tasks, each a fresh subprocess, plus resolve-config, the pass-through
finetune/quantize tasks and the samples at the end). Both on the same tiny config (a slice of the
sample corpus, the `tiny` preset, a few steps, no Ray workers, no evaluation), each in a fresh
workdir and MLflow store; then `lmforge run` again unchanged (cache reuse). Prints one JSON line.

    flock /tmp/lmforge-bench.lock .venv/bin/python benchmarks/pipeline_overhead.py [--steps 6]
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
        "finetune.enabled=false",
        "quantize.method=none",
        "evaluate.suite=null",
        "gate.rules=null",
    ]
    return load(LifecycleConfig, REPO / "configs/demo.yaml", overrides)


def in_process(cfg) -> None:
    """The stage functions the components call, in sequence, in this process."""
    from lmforge.pipelines import steps
    from lmforge.pipelines.local import pipeline_arguments

    config, work = pipeline_arguments(cfg)["config"], Path(cfg.workdir)
    parent = steps.start_tracking(config, "bench-in-process", "lmforge")
    os.environ["LMFORGE_MLFLOW_PARENT_RUN"] = parent
    try:
        art = work / "artifacts"
        art.mkdir(parents=True)
        _, lineage = steps.curate(config, str(art / "data"), str(art / "datacard.md"))
        _, lineage = steps.train_tokenizer(
            config, str(art / "data"), str(art / "tok"), str(art / "r.md"), lineage
        )
        _, lineage = steps.tokenize(str(art / "data"), str(art / "tok"), str(art / "shards"), lineage)
        (art / "pretrain").mkdir()
        _, lineage = steps.pretrain(
            config, str(art / "shards"), str(art / "pretrain" / "model"), str(art / "loss.png"), lineage
        )
        steps.register(config, str(art / "pretrain" / "model"), lineage, {})
    finally:
        os.environ.pop("LMFORGE_MLFLOW_PARENT_RUN", None)
        steps.finish_tracking(parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    from lmforge.pipelines.local import run_pipeline_locally

    with tempfile.TemporaryDirectory(prefix="lmf-pipe-bench-") as tmp:
        tmp_path = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'a.db'}"
        start = time.perf_counter()
        in_process(config(tmp_path / "a", args.steps))
        baseline = time.perf_counter() - start

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
                "figure": "stage functions in one process vs lmforge run (kfp.local pipeline), tiny config",
                "in_process_s": round(baseline, 1),
                "kfp_local_s": round(kfp_local, 1),
                "ratio_kfp_over_in_process": round(kfp_local / baseline, 2),
                "kfp_local_rerun_s": round(kfp_again, 1),
                "rerun_reused": sum(s["status"] == "reused" for s in again.steps.values()),
                "load_average": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
