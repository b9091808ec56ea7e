"""Fine-tuning side by side: trainable share, peak memory and step time of LoRA, QLoRA-int8 and full
fine-tuning with `lmforge finetune`, and LoRA with transformers + peft on the same base, LoRA
config, data and batch, in one run.

    python benchmarks/finetune_bench.py                       # SmolLM2-135M shape, 3 steps each
    python benchmarks/finetune_bench.py --shape small --steps 5

The base has the SmolLM2-135M architecture (30 layers, d_model 576, GQA 9:3, vocab 49152, tied)
with random weights and SmolLM2's tokenizer (data/reference_tokenizers/smollm2): memory and step
time depend on the shapes, not on the values (the pretrained weights are not bundled; quality
before/after needs `lmforge import-hf` of the real checkpoint). Data: the bundled task
(data/finetune/train.jsonl), 8 examples of <= 256 tokens per step, padded, one micro-batch.
Every method runs in its own process, so each peak RSS (ru_maxrss, sampled by the training loop at
its log steps) is that method's alone. Step time: the median of the steps after the first.
Prints one JSON line per method and a summary line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "reference_tokenizers" / "smollm2"
DATA = REPO / "data" / "finetune" / "train.jsonl"
SHAPES = {
    # SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M)
    "smollm2-135m": dict(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
        max_seq_len=2048, rope_theta=100000.0, tie_embeddings=True, bos_token_id=0, eos_token_id=0,
    ),
    "small": dict(
        vocab_size=49152, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=704, max_seq_len=512,
    ),
}  # fmt: skip
LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_base(root: Path, shape: str) -> Path:
    import torch

    from lmforge.model.checkpoint import save_model_dir
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPES[shape]))
    return save_model_dir(model, root / "base", tokenizer_dir=TOKENIZER)


def lmforge_worker(method: str, base: Path, out: Path, args: argparse.Namespace) -> dict:
    from lmforge.components.finetune.config import load_finetune_config
    from lmforge.components.finetune.stage import finetune

    steps = []
    cfg = load_finetune_config(
        None,
        [
            f"base_model={base}",
            f"method={method}",
            f"data.train={DATA}",
            f"output_dir={out}",
            f"max_seq_len={args.seq}",
            f"data.global_batch_size={args.batch}",
            f"data.micro_batch_size={args.batch}",
            f"schedule.max_steps={args.steps}",
            "schedule.warmup_steps=0",
            "optim.lr=1e-4",
            "eval.every=0",
            f"checkpoint.every={args.steps}",
            "tracking.enabled=false",
            "tracking.log_every=1",
            "lora.r=8",
            "lora.alpha=16",
            f"lora.target_modules=[{', '.join(LORA)}]",
        ]
        + (["qlora.bits=8"] if method == "qlora" else [])
        + (["strategy.activation_checkpointing=true"] if args.activation_checkpointing else []),
    )
    last = [time.perf_counter()]

    def on_step(step: int, rank: int) -> None:  # each optimizer step's wall time
        now = time.perf_counter()
        steps.append(now - last[0])
        last[0] = now

    result = finetune(cfg, verbose=False, on_step=on_step)
    return {
        "method": method,
        "trainable_params": int(result.metrics["model/trainable_params"]),
        "trainable_pct": round(result.metrics["model/trainable_pct"], 4),
        "peak_rss_gb": round(result.metrics["train/peak_mem_gb"], 3),
        "step_s": round(statistics.median(steps[1:] or steps), 3),
        "train_loss": round(result.metrics["train/loss"], 4),
    }


def hf_worker(base: Path, args: argparse.Namespace) -> dict:
    """transformers + peft, the same LoRA config, rows and optimizer settings."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from lmforge.components.finetune.data import (
        DataFormat,
        SFTDataset,
        load_encoder,
        load_examples,
        make_rows,
    )

    enc = load_encoder(base, 0, need_chat=False)
    examples, _ = load_examples(DATA, DataFormat(), enc, args.seq, "truncate")
    data = SFTDataset(make_rows(examples, args.seq, False, enc.pad_id), seed=0)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA, lora_dropout=0.0))
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    times, loss = [], None
    for _ in range(args.steps):
        inputs, targets, _, _ = data.next_batch(args.batch)
        t = time.perf_counter()
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "method": "hf-peft-lora",
        "trainable_params": trainable,
        "trainable_pct": round(100 * trainable / total, 4),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
        "step_s": round(statistics.median(times[1:] or times), 3),
        "train_loss": round(float(loss), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--methods", default="lora,qlora,full,hf")
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each block in backward (lmforge)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "hf":
            record = hf_worker(Path(args.base), args)
        else:
            record = lmforge_worker(args.worker, Path(args.base), Path(args.out), args)
        print("RESULT " + json.dumps(record), flush=True)
        return 0

    with tempfile.TemporaryDirectory(prefix="lmforge-ft-bench-") as tmp:
        root = Path(tmp)
        base = build_base(root, args.shape)
        from lmforge.components.quantize.stage import quantize

        q8 = quantize(base, root / "base-int8", method="int8").output_dir
        results = {}
        for method in args.methods.split(","):
            model = q8 if method == "qlora" else base
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                method,
                "--base",
                str(model),
                "--out",
                str(root / method),
            ]
            cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
            cmd += ["--activation-checkpointing"] if args.activation_checkpointing else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{method} failed")
            results[method] = json.loads(lines[-1][len("RESULT ") :])
            print(json.dumps({"shape": args.shape, **results[method]}), flush=True)
        summary: dict = {"shape": args.shape, "steps": args.steps, "batch": args.batch, "seq": args.seq}
        summary["activation_checkpointing"] = args.activation_checkpointing
        if "lora" in results and "full" in results:
            summary["lora_rss_vs_full"] = round(
                results["lora"]["peak_rss_gb"] / results["full"]["peak_rss_gb"], 3
            )
        if "qlora" in results and "full" in results:
            summary["qlora_rss_vs_full"] = round(
                results["qlora"]["peak_rss_gb"] / results["full"]["peak_rss_gb"], 3
            )
        if "lora" in results and "hf" in results:
            summary["lora_step_vs_hf_peft"] = round(results["lora"]["step_s"] / results["hf"]["step_s"], 3)
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
