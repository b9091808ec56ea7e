"""Quantization side by side: weight memory, held-out perplexity and batch-1 CPU decode speed of
the same model in fp32 and after `lmforge quantize` with int8, int4, int4-awq and int4-gptq.

    .venv/bin/python benchmarks/quantize_bench.py [--model DIR --shards DIR] [--steps 200] [--out DIR]

Without --model it first trains a small model on the repo's sample corpus (data/sample, Python
tutorial) with `lmforge pretrain`'s stage, so the model has something to lose. Perplexity is measured
on the held-out validation split (documents never trained on); calibration uses the train split.
Memory is numel * element size of every tensor the loaded model stores (measured, not estimated).
Decode speed: the engine, one slot, greedy, eager (as `lmforge serve` runs on CPU), tokens per second.

With --model DIR and no --shards (e.g. the imported SmolLM2-135M-Instruct, `scripts/fetch_smollm2.py`):
held-out text = the repo's sample document(s) `HELD_OUT_DOCS` (11.2k characters of Python tutorial,
tokenized with the model's tokenizer), scored as bits per byte and per-token perplexity over windows of
--seq-len tokens; calibration = the other sample documents (a JSONL written under --out), windows of
--calib-len tokens. Also measured: the memory the loaded engine model holds (parameters and buffers,
after `share_tied_embedding`), batch-1 decode through the eager engine and (--compile) the compiled
one-slot engine, and torch's fbgemm dynamic int8 linear (`torch.ao.quantization.quantize_dynamic`,
activations quantized per tensor at run time) as the library comparison. `--library torchao` adds what a
user would pick instead: the Hugging Face export of the same model (`--hf-model`, default DIR-hf as
written by scripts/fetch_smollm2.py) decoded with transformers `generate()` in fp32 and with torchao's
int8 weight-only config (`quantize_(model, Int8WeightOnlyConfig())`), same prompt and new tokens, in
the same process (rows `hf-fp32`, `hf-torchao-int8`; tok/s column only).

    .venv/bin/python benchmarks/quantize_bench.py --model ~/.cache/lmforge/models/smollm2-135m-instruct \
        --methods int8,int4,int4-gptq --compile --reuse --out /tmp/lmforge-quantize-bench-smollm2
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


def decode_tokens_per_s(model, new_tokens: int, repeats: int, compile: bool = False) -> float:
    """Median tokens/s of one prompt (one slot), greedy, after a warm-up (which compiles, if asked)."""
    from lmforge.model.engine import Engine
    from lmforge.model.generation import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    prompt = list(range(5, 21))
    engine = Engine(model, num_slots=1, max_len=len(prompt) + new_tokens + 1, compile=compile)

    def run() -> int:
        engine.submit(prompt, params)
        n = 0
        while engine.has_work():
            n += sum(1 for e in engine.step() if e.token_id is not None)
        return n

    return median_rate(run, repeats)


def median_rate(run, repeats: int) -> float:
    """Median of `run()`'s returned count per second over `repeats` calls, after one warm-up call."""
    run()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


# ---- text mode (an imported model, e.g. SmolLM2-135M): held-out documents, bits per byte ------------
SAMPLE = REPO / "data" / "sample" / "python-docs"
NOT_CALIBRATED = ("tutorial/floatingpoint.rst.txt", "tutorial/stdlib.rst.txt")  # kept out of calibration
HELD_OUT_DOCS = NOT_CALIBRATED[:1]  # scored: 11.2k characters (one document keeps a run short on 2 cores)


def sample_texts() -> tuple[str, list[str]]:
    """(held-out text, calibration documents): disjoint documents of the repo's bundled sample."""
    held = "\n\n".join((SAMPLE / d).read_text(encoding="utf-8") for d in HELD_OUT_DOCS)
    calib = [
        p.read_text(encoding="utf-8")
        for p in sorted(SAMPLE.rglob("*.txt"))
        if str(p.relative_to(SAMPLE)) not in NOT_CALIBRATED
    ]
    return held, calib


def write_calibration(out: Path) -> Path:
    path = out / "calibration.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts()[1]))
    return path


@torch.no_grad()
def text_scores(model, model_dir: Path, seq_len: int) -> dict[str, float]:
    """Bits per byte and per-token perplexity of the held-out text, in windows of seq_len tokens."""
    from lmforge.tokenizer_files import load_tokenizer

    text = sample_texts()[0]
    ids = load_tokenizer(model_dir).encode(text).ids
    n = (len(ids) - 1) // seq_len
    x = torch.tensor(ids[: n * seq_len + 1])
    inputs, targets = x[:-1].view(n, seq_len), x[1:].view(n, seq_len)
    nats = 0.0
    for s in range(0, n, 4):
        nats += float(model(inputs[s : s + 4], targets=targets[s : s + 4])) * targets[s : s + 4].numel()
    scored_bytes = len(text.encode("utf-8")) * (n * seq_len) / (len(ids) - 1)  # the windows' share
    return {
        "bpb": nats / math.log(2) / scored_bytes,
        "ppl": math.exp(nats / targets.numel()),
        "tokens": targets.numel(),
    }


def held_bytes(model) -> int:
    """Bytes of every tensor the loaded model holds (parameters and buffers, each storage once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def fbgemm_dynamic(model):
    """torch's library route: every nn.Linear -> DynamicQuantizedLinear (fbgemm/x86 int8 weights,
    activations quantized per tensor at run time). The output head (LMHead) stays fp32."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def hf_generate_tokens_per_s(model, new_tokens: int, repeats: int) -> float:
    """Median tokens/s of transformers `generate()`: the same 16-token prompt as the engine rows, greedy,
    exactly `new_tokens` new tokens, after a warm-up."""
    prompt = torch.arange(5, 21).unsqueeze(0)

    def run() -> int:
        out = model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
        return out.shape[1] - prompt.shape[1]

    with torch.inference_mode():
        return median_rate(run, repeats)


def torchao_rows(hf_dir: Path, args) -> list[dict]:
    """transformers fp32 vs transformers + torchao int8 weight-only on the same HF checkpoint."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    rows = []
    for name in ("hf-fp32", "hf-torchao-int8"):
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        if name == "hf-torchao-int8":
            quantize_(model, Int8WeightOnlyConfig())
        row = {
            "variant": name,
            "stored_bytes": 0,
            "held_bytes": 0,
            "tok_s": hf_generate_tokens_per_s(model, args.new_tokens, args.repeats),
            "load": os.getloadavg(),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
    return rows


def text_mode(args) -> None:
    from lmforge.components.quantize.stage import quantize
    from lmforge.model import int8_gemv
    from lmforge.model.checkpoint import load_model_dir
    from lmforge.model.decode_layout import apply_decode_layout
    from lmforge.model.quantized import share_tied_embedding, tensor_bytes

    model_dir = args.model.expanduser()
    calib = write_calibration(args.out)
    rows = []

    def measure(name: str, model, stored: int, extra: dict) -> None:
        t = time.perf_counter()
        row = {"variant": name, "stored_bytes": stored, "held_bytes": held_bytes(model), **extra}
        if not args.skip_quality:
            row.update(text_scores(model, model_dir, args.seq_len))
        row["eval_s"] = round(time.perf_counter() - t, 1)
        if not args.skip_speed:
            row["tok_s"] = decode_tokens_per_s(apply_decode_layout(model), args.new_tokens, args.repeats)
        if not args.skip_speed and args.compile and not name.startswith("int4") and name != "fbgemm-dyn":
            row["tok_s_compiled"] = decode_tokens_per_s(
                load_fresh(name), args.new_tokens, args.repeats, compile=True
            )
        row["load"] = os.getloadavg()
        rows.append(row)
        print(json.dumps(row), flush=True)

    dirs = {"fp32": model_dir}

    def load_fresh(name: str):
        m = load_model_dir(dirs[name], dtype=torch.float32 if name == "fp32" else None)
        return share_tied_embedding(m) if name != "fp32" else m

    fp32 = load_model_dir(model_dir, dtype=torch.float32)
    measure("fp32", fp32, tensor_bytes(fp32), {"bf16_bytes": tensor_bytes(fp32) // 2})
    if "fbgemm" in args.library:
        measure("fbgemm-dyn", fbgemm_dynamic(load_model_dir(model_dir, dtype=torch.float32)), 0, {})
    del fp32
    for method in args.methods.split(","):
        out = args.out / method
        if not (args.reuse and (out / "report.json").is_file()):
            base_method = method.removesuffix("-noact")  # "int4-gptq-noact": GPTQ in column order
            quantize(
                model_dir,
                out,
                method=base_method,
                group_size=args.group_size,
                gptq_act_order=not method.endswith("-noact"),
                calibration=calib if base_method in ("int4-awq", "int4-gptq") else None,
                seq_len=args.calib_len,
                num_sequences=args.calib_sequences,
                min_sequences=min(64, args.calib_sequences),
                log=print,
            )
        dirs[method] = out
        report = json.loads((out / "report.json").read_text())
        q = load_fresh(method)
        measure(
            method,
            q,
            tensor_bytes(load_model_dir(out)),
            {
                "quantize_s": report["seconds"],
                "calibration_sequences": report["calibration_sequences"],
                "linear_ratio": report["linear_ratio"],
            },
        )
    print(
        f"model {model_dir}; int8 kernel: {int8_gemv.unavailable_reason() or 'used'}; load {os.getloadavg()}"
    )
    base, nan = rows[0], float("nan")
    print(
        f"{'variant':<11} {'stored':>12} {'x fp32':>6} {'held':>12} {'x fp32':>6} {'bits/byte':>9} "
        f"{'dbpb':>7} {'ppl':>7} {'tok/s':>6} {'x fp32':>6} {'compiled':>8} {'x fp32c':>7}"
    )
    for r in rows:
        c = r.get("tok_s_compiled")
        print(
            f"{r['variant']:<11} {r['stored_bytes']:>12,} {r['stored_bytes'] / base['stored_bytes']:>6.3f} "
            f"{r['held_bytes']:>12,} {r['held_bytes'] / base['held_bytes']:>6.3f} {r.get('bpb', nan):>9.4f} "
            f"{100 * (r.get('bpb', nan) / base.get('bpb', nan) - 1):>+6.2f}% {r.get('ppl', nan):>7.3f} "
            f"{r.get('tok_s', nan):>6.1f} {r.get('tok_s', nan) / base.get('tok_s', nan):>6.2f} "
            f"{c or nan:>8.1f} {(c or nan) / base.get('tok_s_compiled', nan):>7.2f}"
        )
    if "torchao" in args.library and not args.skip_speed:
        hf_dir = (args.hf_model or model_dir.parent / f"{model_dir.name}-hf").expanduser()
        hf = torchao_rows(hf_dir, args)
        rows += hf
        ratio = hf[1]["tok_s"] / hf[0]["tok_s"]
        ours = {r["variant"]: r["tok_s"] for r in rows if "tok_s" in r}
        print(
            f"transformers generate(): fp32 {hf[0]['tok_s']:.1f} tok/s, torchao int8 weight-only "
            f"{hf[1]['tok_s']:.1f} tok/s ({ratio:.2f}x fp32); lmforge engine int8 / fp32 (eager): "
            f"{ours.get('int8', nan) / ours['fp32']:.2f}x"
        )
    (args.out / "results.json").write_text(json.dumps({"model": str(model_dir), "rows": rows}, indent=2))


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
    parser.add_argument("--seq-len", type=int, default=256, help="held-out window (text mode)")
    parser.add_argument("--calib-len", type=int, default=128, help="calibration window (text mode)")
    parser.add_argument("--calib-sequences", type=int, default=128, help="calibration windows (text mode)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled one-slot engine")
    parser.add_argument("--reuse", action="store_true", help="reuse quantized directories under --out")
    parser.add_argument(
        "--library",
        default="fbgemm",
        help="comma list: 'fbgemm' adds torch's dynamic int8 linear, 'torchao' transformers + torchao int8 "
        "weight-only (text mode), 'none'",
    )
    parser.add_argument("--hf-model", type=Path, help="HF export of --model for --library torchao")
    parser.add_argument("--skip-quality", action="store_true", help="text mode: no bits/byte (timing only)")
    parser.add_argument("--skip-speed", action="store_true", help="text mode: no decode timing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model is not None and args.shards is None:
        text_mode(args)
        return

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
