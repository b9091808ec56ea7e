"""Fine-tuning side by side: trainable share, peak memory, step time and held-out loss of LoRA,
QLoRA-int8 and full fine-tuning with `lmforge finetune`, and LoRA with transformers + peft on the same
base, LoRA config, data, batch and optimizer, in one run.

    python benchmarks/finetune_bench.py                              # real SmolLM2-135M-Instruct if fetched
    python benchmarks/finetune_bench.py --methods lora,hf --steps 8      # step time + held-out loss vs peft
    python benchmarks/finetune_bench.py --methods lora,qlora,full --steps 2   # memory, all three
    python benchmarks/finetune_bench.py --base random --shape small      # random weights of a shape
    python benchmarks/finetune_bench.py --methods lora,qlora,full --steps 2 --activation-checkpointing
    python benchmarks/finetune_bench.py --methods lora,qlora,full --steps 3 --release-memory-every 1
    python benchmarks/finetune_bench.py --device cuda --base random      # on a GPU (gpu_session.sh)

The base: `--base DIR` (an lmforge model directory); by default the real SmolLM2-135M-Instruct that
`python scripts/fetch_smollm2.py` writes (~/.cache/lmforge/models/smollm2-135m-instruct), else
random weights of the SmolLM2-135M shape with SmolLM2's tokenizer (memory and step time depend on
the shapes only; held-out loss then means nothing). QLoRA's base is `lmforge quantize --method int8`
of it. Data: the bundled task (data/finetune/train.jsonl), 8 examples of <= 256 tokens per step,
padded, one micro-batch, LoRA r=8 alpha 16 dropout 0 on q/k/v/o, AdamW lr 1e-4, no weight decay,
clip 1.0; held-out loss (runs with `hf`): the mean loss over the response tokens of
data/finetune/heldout.jsonl after the last step, computed for both frameworks on the same rows.

Every method runs in its own process, so its memory is its own. Two memory figures:
  peak_rss_gb        the process's own peak resident memory (VmHWM): includes the process itself
                     (Python, torch / peft / transformers imported, the tokenized data)
  train_mem_gb       peak RSS minus the resident memory right before the model is built (after the
                     imports and the data): what training adds, the CPU analogue of CUDA's
                     torch.cuda.max_memory_allocated (which holds no runtime)
Step time: the median of the steps after the first. Prints one JSON line per method and a summary
line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "reference_tokenizers" / "smollm2"
DATA = REPO / "data" / "finetune" / "train.jsonl"
HELDOUT = REPO / "data" / "finetune" / "heldout.jsonl"
SMOLLM2 = Path("~/.cache/lmforge/models/smollm2-135m-instruct").expanduser()  # scripts/fetch_smollm2.py
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


def _rss_gb() -> float:
    from lmforge.memory import resident_gb

    return resident_gb()


def _peak_rss_gb() -> float:
    # VmHWM, not ru_maxrss: a child inherits its parent's ru_maxrss on Linux, and this parent
    # quantizes the base (its peak above some workers') before starting them (lmforge/memory.py)
    from lmforge.memory import peak_resident_gb

    return peak_resident_gb()


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
            f"data.validation={HELDOUT}",
            f"output_dir={out}",
            f"max_seq_len={args.seq}",
            f"data.global_batch_size={args.batch}",
            f"data.micro_batch_size={args.batch}",
            f"schedule.max_steps={args.steps}",
            "schedule.warmup_steps=0",
            "schedule.decay=constant",
            "optim.lr=1e-4",
            "optim.weight_decay=0.0",
            "optim.grad_clip=1.0",
            # held-out loss after the last step, for the comparison with transformers + peft only
            f"eval.every={args.steps if args.heldout else 0}",
            "eval.batches=1000",
            f"checkpoint.every={args.steps}",
            "tracking.enabled=false",
            "tracking.log_every=1",
            "lora.r=8",
            "lora.alpha=16",
            "lora.dropout=0.0",
            f"lora.target_modules=[{', '.join(LORA)}]",
        ]
        + (["qlora.bits=8"] if method == "qlora" else [])
        + (["strategy.activation_checkpointing=true"] if args.activation_checkpointing else [])
        + [f"strategy.release_memory_every={args.release_memory_every}"]
        + (["ray.use_gpu=true"] if args.device == "cuda" else []),
    )
    last = [time.perf_counter()]

    def on_step(step: int, rank: int) -> None:  # each optimizer step's wall time
        now = time.perf_counter()
        steps.append(now - last[0])
        last[0] = now

    result = finetune(cfg, verbose=False, on_step=on_step)
    m = result.metrics
    return {
        "method": method,
        "trainable_params": int(m["model/trainable_params"]),
        "trainable_pct": round(m["model/trainable_pct"], 4),
        "peak_rss_gb": round(m["train/peak_mem_gb"], 3),
        "train_mem_gb": round(m["train/peak_train_mem_gb"], 3),
        # the last step also ran the held-out evaluation: not a training step
        "step_s": round(statistics.median((steps[1:-1] if args.heldout else steps[1:]) or steps), 3),
        "train_loss": round(m["train/loss"], 4),
        "heldout_loss": round(m["val/loss"], 4) if "val/loss" in m else None,
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
    from lmforge.model.checkpoint import read_config

    device = torch.device(args.device)
    enc = load_encoder(base, read_config(base).eos_token_id, need_chat=False)
    examples, _ = load_examples(DATA, DataFormat(), enc, args.seq, "truncate")
    data = SFTDataset(make_rows(examples, args.seq, False, enc.pad_id), seed=0)
    held, _ = load_examples(HELDOUT, DataFormat(), enc, args.seq, "truncate")
    heldout = SFTDataset(make_rows(held, args.seq, False, enc.pad_id), seed=0, shuffle=False)
    torch.manual_seed(0)
    before_model = _rss_gb() if device.type == "cpu" else 0.0
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA, lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    times, loss = [], None
    for _ in range(args.steps):
        inputs, targets, _, _ = (x.to(device) for x in data.next_batch(args.batch))
        t = time.perf_counter()
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    # on a GPU: torch's peak allocation, as lmforge's train/peak_mem_gb reports it there
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else _peak_rss_gb()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in heldout.iter_eval_batches(args.batch):
            inputs, targets = batch[0].to(device), batch[1].to(device)
            logits = model(input_ids=inputs).logits
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
                )
            )
            count += int((targets != -100).sum())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    return {
        "method": "hf-peft-lora",
        "trainable_params": trainable,
        "trainable_pct": round(100 * trainable / total_params, 4),
        "peak_rss_gb": round(peak, 3),
        "train_mem_gb": round(peak - before_model, 3),
        "step_s": round(statistics.median(times[1:] or times), 3),
        "train_loss": round(float(loss), 4),
        "heldout_loss": round(total / count, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base", default="auto", help="an lmforge model dir, 'random' (random weights of --shape), or auto"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--methods", default="lora,qlora,full,hf")
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each block in backward (lmforge)"
    )
    parser.add_argument(
        "--release-memory-every",
        type=int,
        default=0,
        metavar="N",
        help="strategy.release_memory_every (lmforge): trim the C heap every N blocks; 0 = off",
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: memory = torch's peak allocation"
    )
    parser.add_argument("--heldout", action="store_true", help=argparse.SUPPRESS)  # set when hf runs
    parser.add_argument("--worker", help=argparse.SUPPRESS)
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
        if args.base == "auto":
            args.base = str(SMOLLM2) if (SMOLLM2 / "config.json").is_file() else "random"
        base = build_base(root, args.shape) if args.base == "random" else Path(args.base).expanduser()
        label = f"random {args.shape}" if args.base == "random" else str(base)
        from lmforge.components.quantize.stage import quantize

        q8 = None
        if "qlora" in args.methods.split(","):
            q8 = quantize(base, root / "base-int8", method="int8").output_dir
        results = {}
        load_start = list(os.getloadavg())
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
            cmd += ["--release-memory-every", str(args.release_memory_every), "--device", args.device]
            cmd += ["--heldout"] if "hf" in args.methods.split(",") else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{method} failed")
            results[method] = json.loads(lines[-1][len("RESULT ") :])
            print(json.dumps({"base": label, **results[method]}), flush=True)
        summary: dict = {"base": label, "steps": args.steps, "batch": args.batch, "seq": args.seq}
        summary["activation_checkpointing"] = args.activation_checkpointing
        summary["release_memory_every"] = args.release_memory_every
        summary["device"] = args.device
        for method in ("lora", "qlora"):
            if method in results and "full" in results:
                for key in ("peak_rss_gb", "train_mem_gb"):
                    ratio = results[method][key] / results["full"][key]
                    summary[f"{method}_{key.removesuffix('_gb')}_vs_full"] = round(ratio, 3)
        if "lora" in results and "hf" in results:
            summary["lora_step_vs_hf_peft"] = round(results["lora"]["step_s"] / results["hf"]["step_s"], 3)
            summary["heldout_loss_lora_vs_hf"] = [
                results["lora"]["heldout_loss"],
                results["hf"]["heldout_loss"],
            ]
        summary["loadavg_start_end"] = [load_start, list(os.getloadavg())]
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
