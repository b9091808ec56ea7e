"""Forward+backward training-step throughput: lmforge's model vs transformers' LlamaForCausalLM.

Both models get identical dimensions AND identical weights (the lmforge model is saved and loaded by
transformers), the same batch and the same loss, so the only difference is the implementation.
Measured eager and under torch.compile; runs are interleaved (A, B, A, B, ...) so machine noise hits
both sides alike. Prints one JSON line per figure and the ratios against the Hugging Face eager figure.

    python benchmarks/train_step_throughput.py --preset small --seq-len 256 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.model.checkpoint import save_model_dir
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer, cross_entropy_loss


def lmforge_step(model, ids):
    # lmforge's training path: the model returns the loss through the fused head + cross-entropy
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    return loss


def lmforge_logits_step(model, ids):
    # the same model through full logits + F.cross_entropy (what the fused loss replaces), for attribution
    loss = cross_entropy_loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    return loss


def hf_step(model, ids):
    # labels=ids: transformers shifts internally, so both sides score the same next-token targets
    loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
    loss.backward()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per contestant")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contestants")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(args.preset, max_seq_len=max(args.seq_len + 1, 64))
    ours = Transformer(cfg).train()
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(ours, tmp)
        # sdpa: transformers' default and fastest eager attention on CPU
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="sdpa"
        ).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1))

    contestants = {
        "hf_eager": (hf, hf_step),
        "lmforge_eager": (ours, lmforge_step),
        "lmforge_eager_unfused_loss": (ours, lmforge_logits_step),
    }
    if not args.no_compile:
        contestants["hf_compiled"] = (torch.compile(hf), hf_step)
        contestants["lmforge_compiled"] = (torch.compile(ours), lmforge_step)

    # identical weights -> identical losses (a cheap guard that we compare like with like)
    l_ours, l_hf = lmforge_step(ours, ids).item(), hf_step(hf, ids).item()
    assert abs(l_ours - l_hf) < 1e-3, (l_ours, l_hf)

    for model, step in contestants.values():  # warm-up (compilation happens here)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            step(model, ids)
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(args.rounds):
        for name, (model, step) in contestants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                model.zero_grad(set_to_none=True)
                step(model, ids)
            times[name].append((time.perf_counter() - start) / args.steps)

    tokens = args.batch_size * args.seq_len
    machine = (
        f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    results = {}
    for name, ts in times.items():
        best = min(ts)  # least-disturbed round
        results[name] = tokens / best
        print(
            json.dumps(
                {
                    "figure": f"{name}_tokens_per_s",
                    "value": round(tokens / best, 1),
                    "step_s": round(best, 4),
                    "preset": args.preset,
                    "params": cfg.num_params(),
                    "batch": args.batch_size,
                    "seq_len": args.seq_len,
                    "machine": machine,
                }
            )
        )
    for name in results:
        if name != "hf_eager":
            # best-round ratio, and the median over rounds of the same-round ratio (robust to drifting noise)
            per_round = [times["hf_eager"][r] / times[name][r] for r in range(args.rounds)]
            paired = sorted(per_round)
            print(
                json.dumps(
                    {
                        "figure": f"{name}_vs_hf_eager",
                        "ratio": round(results[name] / results["hf_eager"], 3),
                        "median_paired_ratio": round(paired[len(paired) // 2], 3),
                        "per_round": [round(x, 3) for x in per_round],
                    }
                )
            )


if __name__ == "__main__":
    main()
