r"""Distillation benchmark: a student with half the teacher's layers, distilled, against the same-size
student trained from scratch for the same steps, and against the teacher, in bits per byte on held-out
text (lmforge.components.evaluate's rolling log-likelihood scoring).

    python benchmarks/distill_bench.py                       # ~25 min on the shared 2-core VM (RESULTS.md)

All in one run, same data, same held-out documents:
  1. corpus: data/sample/python-docs (every 8th file held out), a byte-level BPE tokenizer, token shards
  2. teacher: L layers, pretrained `--teacher-steps` steps (lmforge's pretraining stage, in-process)
  3. students with L/2 layers, each `--student-steps` steps, same optimizer / schedule / batches:
       scratch           random init, hard labels only (plain pretraining)
       distill           `lmforge distill --student-preset teacher-half`: init from evenly spaced teacher
                         layers, loss alpha*T^2*KL + (1-alpha)*CE
       distill-random    random init, the same distillation loss (what the KL term alone buys)
       half-init-ce      teacher-half init, hard labels only (alpha=0: what the init alone buys)
  4. bits per byte of every model on the held-out documents, and the fraction of the scratch->teacher
     gap the distilled student recovers: (bpb_scratch - bpb_distill) / (bpb_scratch - bpb_teacher)
Prints one JSON line per model and a summary line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "sample" / "python-docs"


def build_data(root: Path, vocab: int) -> tuple[Path, list[str]]:
    from lmforge.components.tokenize_shards import tokenize_dataset
    from lmforge.components.tokenizer import train_tokenizer

    files = sorted(CORPUS.rglob("*.txt"))
    held = [f for i, f in enumerate(files) if i % 8 == 0]
    train = [f for f in files if f not in held]
    curated = root / "curated"
    for split, group in (("train", train), ("validation", held)):
        (curated / split).mkdir(parents=True)
        with open(curated / split / "part-00000.jsonl", "w") as fh:
            for f in group:
                fh.write(json.dumps({"id": f.stem, "text": f.read_text()}) + "\n")
    tok = root / "tokenizer"
    train_tokenizer(train, tok, vocab_size=vocab, holdout_fraction=0.0, reference_tokenizers=[])
    tokenize_dataset(curated, tok, root / "tokens", progress=False)
    return root / "tokens", [f.read_text() for f in held]


def bits_per_byte(model_dir: Path, texts: list[str], window: int) -> dict[str, float]:
    from lmforge.components.evaluate.scoring import document_nlls
    from lmforge.model import load_model_dir
    from lmforge.tokenizer_files import load_tokenizer

    model = load_model_dir(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else model.config.eos_token_id
    sequences = [[bos, *tokenizer.encode(t, add_special_tokens=False).ids] for t in texts]
    docs = document_nlls(model, sequences, window=window, stride=window, batch_size=8)
    nll, tokens = sum(n for n, _ in docs), sum(t for _, t in docs)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "bits_per_byte": nll / (num_bytes * math.log(2)),
        "nats_per_token": nll / tokens,
        "tokens": tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--student-steps", type=int, default=150)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a loaded 2-core VM)")
    ap.add_argument("--workdir", help="keep the runs here (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmforge.components.distill import DistillConfig, distill
    from lmforge.components.pretrain import PretrainConfig, pretrain
    from lmforge.config import build

    root = Path(args.workdir or tempfile.mkdtemp(prefix="distill-bench-"))
    started = time.time()
    shards, texts = build_data(root, args.vocab)
    heads = max(2, args.d_model // 32)
    arch = {"d_model": args.d_model, "n_heads": heads, "n_kv_heads": heads // 2, "max_seq_len": 256}

    def common(out: str, steps: int, layers: int) -> dict:
        return {
            "output_dir": str(root / out),
            "seed": 0,
            "model": {"preset": "tiny", "overrides": {**arch, "n_layers": layers, "d_ff": None}},
            "data": {
                "shards_dir": str(shards),
                "seq_len": args.seq_len,
                "global_batch_size": args.batch_size,
                "micro_batch_size": args.batch_size,
            },
            "optim": {"lr": args.lr},
            "schedule": {"max_steps": steps, "warmup_steps": max(1, steps // 20)},
            "checkpoint": {"every": steps, "keep_last": 1},
            "eval": {"every": 0},
            "tracking": {"enabled": False, "log_every": max(1, steps // 10)},
            "ray": {"num_workers": 0},
        }

    results: dict[str, dict] = {}
    timings: dict[str, float] = {}

    def record(name: str, model_dir: Path, seconds: float) -> None:
        figures = bits_per_byte(model_dir, texts, args.seq_len)
        results[name] = figures
        timings[name] = seconds
        print(json.dumps({"model": name, **figures, "train_seconds": round(seconds, 1)}), flush=True)

    t = time.time()
    teacher = pretrain(
        build(PretrainConfig, common("teacher", args.teacher_steps, args.layers)), verbose=False
    )
    record("teacher", teacher.model_dir, time.time() - t)
    half = math.ceil(args.layers / 2)

    t = time.time()
    scratch = pretrain(build(PretrainConfig, common("scratch", args.student_steps, half)), verbose=False)
    record("scratch", scratch.model_dir, time.time() - t)

    def run_distill(name: str, alpha: float, from_teacher: bool) -> None:
        cfg = common(name, args.student_steps, half)
        cfg["distill"] = {
            "teacher": str(teacher.model_dir),
            "alpha": alpha,
            "temperature": args.temperature,
            "eval_batches": 0,
            "student_layers": "half" if from_teacher else None,
        }
        t = time.time()
        result = distill(build(DistillConfig, cfg))
        record(name, result.model_dir, time.time() - t)

    run_distill("distill", args.alpha, from_teacher=True)
    run_distill("distill-random", args.alpha, from_teacher=False)
    run_distill("half-init-ce", 0.0, from_teacher=True)

    bpb = {k: v["bits_per_byte"] for k, v in results.items()}
    gap = bpb["scratch"] - bpb["teacher"]

    def recovered(name: str) -> float:
        return (bpb["scratch"] - bpb[name]) / gap if gap > 0 else float("nan")

    print(
        json.dumps(
            {
                "summary": "fraction of the scratch->teacher bits-per-byte gap recovered (target >= 0.5)",
                "distill": round(recovered("distill"), 3),
                "distill-random": round(recovered("distill-random"), 3),
                "half-init-ce": round(recovered("half-init-ce"), 3),
                "bpb": {k: round(v, 4) for k, v in bpb.items()},
                "teacher_layers": args.layers,
                "student_layers": half,
                "teacher_steps": args.teacher_steps,
                "student_steps": args.student_steps,
                "tokens_per_step": args.batch_size * args.seq_len,
                "held_out_docs": len(texts),
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch threads {args.threads}",
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "wall_seconds": round(time.time() - started, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
