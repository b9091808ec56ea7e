"""Quantization side by side: weight memory, held-out perplexity and batch-1 CPU decode speed of
the same model in fp32 and after `lmforge quantize` with int8, int4, int4-awq and int4-gptq.

    .venv/bin/python benchmarks/quantize_bench.py [--model DIR --shards DIR] [--steps 200] [--out DIR]

Without --model it first trains a small model on the repo's sample corpus (data/sample, Python
tutorial) with `lmforge pretrain`'s stage, so the model has something to lose. Perplexity is measured
on the held-out validation split (documents never trained on); calibration uses the train split.
Memory is numel * element size of every tensor the loaded model stores (measured, not estimated).
Decode speed: the engine, one slot, greedy, eager (as `lmforge serve` runs on CPU), tokens per second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_model(root: Path, steps: int) -> tuple[Path, Path]:
    from lmforge.components.pretrain.stage import pretrain
    from tests.components._pretrain_data import build_sample_shards, tiny_config

    shards = build_sample_shards(root)
    cfg = tiny_config(
        shards,
        root / "pretrain",
        f"schedule.max_steps={steps}",
        "schedule.warmup_steps=20",
        "eval.every=0",
        f"checkpoint.every={steps}",
        "data.global_batch_size=8",
        "data.micro_batch_size=8",
        model={
            "preset": "tiny",
            "overrides": {"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "d_ff": 384},
        },
    )
    result = pretrain(cfg, verbose=False)
    assert result.model_dir is not None
    return result.model_dir, shards


@torch.no_grad()
def perplexity(model, shards: Path, seq_len: int, max_sequences: int) -> float:
    from lmforge.components.token_dataset import PackedTokenDataset

    data = PackedTokenDataset(shards, "validation", seq_len, shuffle=False)
    n = min(max_sequences, data.num_sequences)
    x, y = data.next_batch(n)
    total = 0.0
    for s in range(0, n, 8):
        total += float(model(x[s : s + 8], targets=y[s : s + 8])) * y[s : s + 8].numel()
    return math.exp(total / y.numel())


def decode_tokens_per_s(model, new_tokens: int, repeats: int) -> float:
    from lmforge.model.generation import SamplingParams, generate

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    prompt = list(range(5, 21))
    generate(model, prompt, params)  # warm-up (one prompt: a one-slot engine)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = generate(model, prompt, params)
        rates.append(len(out.token_ids) / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="fp32 model directory (default: train one)")
    parser.add_argument(
        "--shards", type=Path, help="token shards with train/validation splits (with --model)"
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps when no --model is given")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lmforge-quantize-bench"))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="int8,int4,int4-awq,int4-gptq")
    args = parser.parse_args()

    from lmforge.components.quantize.stage import quantize
    from lmforge.model.checkpoint import load_model_dir
    from lmforge.model.decode_layout import apply_decode_layout
    from lmforge.model.quantized import quantized_modules, tensor_bytes

    args.out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        model_dir, shards = train_model(args.out / "train", args.steps)
    else:
        model_dir, shards = args.model, args.shards
    fp32 = load_model_dir(model_dir, dtype=torch.float32)
    seq_len = 64
    rows = []
    fp32_bytes = tensor_bytes(fp32)
    bf16_bytes = tensor_bytes(load_model_dir(model_dir, dtype=torch.bfloat16))
    ppl0 = perplexity(fp32, shards, seq_len, args.eval_sequences)
    speed0 = decode_tokens_per_s(apply_decode_layout(fp32), args.new_tokens, args.repeats)
    rows.append({"variant": "fp32", "bytes": fp32_bytes, "ppl": ppl0, "tok_s": speed0})
    for method in args.methods.split(","):
        result = quantize(
            model_dir,
            args.out / method,
            method=method,
            group_size=args.group_size,
            calibration=shards,
            seq_len=seq_len,
            num_sequences=256,
        )
        q = load_model_dir(result.output_dir)
        layers = quantized_modules(q)
        rows.append(
            {
                "variant": method,
                "bytes": tensor_bytes(q),
                "linear_ratio": result.report["linear_ratio"],
                "ppl": perplexity(q, shards, seq_len, args.eval_sequences),
                "tok_s": decode_tokens_per_s(apply_decode_layout(q), args.new_tokens, args.repeats),
                "quantize_s": result.report["seconds"],
                "layers": len(layers),
            }
        )
    print(
        f"model {model_dir}: {sum(p.numel() for p in fp32.parameters()):,} parameters; load {os.getloadavg()}"
    )
    print(
        f"{'variant':<10} {'bytes':>10} {'x fp32':>7} {'x bf16':>7} {'linear x':>8} "
        f"{'ppl':>8} {'dppl':>7} {'tok/s':>7} {'x fp32':>6}"
    )
    for r in rows:
        print(
            f"{r['variant']:<10} {r['bytes']:>10,} {r['bytes'] / fp32_bytes:>7.3f} "
            f"{r['bytes'] / bf16_bytes:>7.3f} "
            f"{r.get('linear_ratio', 1.0):>8.3f} {r['ppl']:>8.3f} {100 * (r['ppl'] / ppl0 - 1):>+6.2f}% "
            f"{r['tok_s']:>7.1f} {r['tok_s'] / speed0:>6.2f}"
        )
    (args.out / "results.json").write_text(
        json.dumps(
            {"model": str(model_dir), "load": os.getloadavg(), "bf16_bytes": bf16_bytes, "rows": rows},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
