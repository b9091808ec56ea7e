"""Fine-tuning quality before / after: the real SmolLM2-135M-Instruct, LoRA r=8 on q/k/v/o, on the
bundled documentation task (data/finetune/), scored with the task's held-out loss and with
`lmforge evaluate` (configs/eval-finetune.yaml: generation scores on the held-out answers plus the
perplexity of data/eval), the base and the fine-tuned model in one `lmforge evaluate --baseline` run.

    python scripts/fetch_smollm2.py                      # once: ~/.cache/lmforge/models/smollm2-135m-instruct
    python benchmarks/finetune_quality.py                # fine-tune (configs/finetune-smollm2.yaml) + score
    python benchmarks/finetune_quality.py --skip-train   # score an existing OUTPUT/merged again

Held-out loss: the mean next-token loss over the response (+ eos) tokens of data/finetune/heldout.jsonl,
computed the same way for both models (the fine-tuning task's validation rows, `method: full` on
the model directory, so no adapter code is involved in the number). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "finetune-smollm2.yaml"
SUITE = REPO / "configs" / "eval-finetune.yaml"


def heldout_loss(model_dir: str, cfg_path: Path, overrides: list[str]) -> float:
    """Mean loss over the scored tokens of the config's `data.validation`, for a model directory."""
    from lmforge.components.finetune.config import load_finetune_config
    from lmforge.components.finetune.stage import preflight
    from lmforge.components.pretrain.env import RunEnv

    cfg = load_finetune_config(
        cfg_path, [*overrides, f"base_model={model_dir}", "method=full", "tracking.enabled=false"]
    )
    prep = preflight(cfg)
    task, train_cfg = prep.task, prep.cfg.to_train_config()
    env = RunEnv(str(Path(cfg.output_dir) / "unused"), 1, None)
    data = task.val_data(train_cfg, env)
    assert data is not None, "the config has no data.validation"
    model = task.build_model(train_cfg, prep.model_cfg).eval()
    total = count = 0.0
    with torch.no_grad():
        for batch in data.iter_eval_batches(cfg.data.micro_batch_size):
            scored = int((batch[1] != -100).sum())
            if scored:
                total += float(task.loss(model, batch)) * scored
                count += scored
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip-train", action="store_true", help="score the existing OUTPUT/merged")
    parser.add_argument("--eval-output", default="out/eval-finetune-quality")
    args = parser.parse_args()

    from lmforge.components.finetune.config import load_finetune_config
    from lmforge.components.finetune.stage import finetune, preflight

    cfg = load_finetune_config(args.config, args.overrides)
    base = preflight(cfg).task.base_dir
    merged = Path(cfg.output_dir).expanduser().resolve() / "merged"
    record: dict = {"base": base, "config": str(args.config), "overrides": args.overrides}
    record["heldout_loss_before"] = round(heldout_loss(base, args.config, args.overrides), 4)
    print(json.dumps(record), flush=True)
    if not args.skip_train:
        t = time.perf_counter()
        result = finetune(cfg, verbose=False)
        if result.preempted:
            raise SystemExit(f"stopped at step {result.step}; nothing to score")
        record["train_seconds"] = round(time.perf_counter() - t, 1)
        record["train_metrics"] = {k: round(v, 4) for k, v in result.metrics.items()}
        merged = result.merged_dir or merged
        # the run's final validation loss: the same rows and loss as heldout_loss (dropout is off)
        record["heldout_loss_after"] = round(result.metrics["val/loss"], 4)
    else:
        record["heldout_loss_after"] = round(heldout_loss(str(merged), args.config, args.overrides), 4)
    print(json.dumps(record), flush=True)

    cmd = [sys.executable, "-m", "lmforge.cli", "evaluate", "--model", str(merged), "--baseline", base]
    cmd += ["--suite", str(SUITE), "--output", args.eval_output]
    subprocess.run(cmd, check=True)
    metrics = json.loads((Path(args.eval_output) / "metrics.json").read_text())
    record["evaluate"] = {
        task: {m: {"before": metrics["baseline"]["tasks"][task][m], "after": v} for m, v in values.items()}
        for task, values in metrics["tasks"].items()
    }
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
