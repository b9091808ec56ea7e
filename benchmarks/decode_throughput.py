"""Decode throughput, measured side by side in one run; one JSON line per figure on stdout.

CPU (default): the `small` preset with random weights (throughput does not depend on the values), fp32.
  batch1_greedy   batch-1 greedy decode tokens/s: lmforge `generate` vs transformers `generate()`
                  on the same weights (loaded by transformers from the model directory lmforge wrote).
  engine_16       aggregate tokens/s of 16 requests run concurrently through the batching engine vs
                  the same 16 requests one after another.
GPU (--gpu): `seed-1.3b` bf16 batch-1 greedy decode tokens/s, eager and compiled (static shapes +
  CUDA graphs), and peak GPU memory; runs in well under 5 minutes on one H100.

Runs are interleaved (ours, theirs, ours, ...) and the median is reported, so a machine shared with
other work slows both sides alike.

    python benchmarks/decode_throughput.py                   # CPU, a few minutes on 2 cores
    python benchmarks/decode_throughput.py --gpu             # one CUDA device
    python benchmarks/decode_throughput.py --gpu --device cpu --preset tiny   # smoke-test the GPU path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.model.config import ModelConfig
from lmforge.model.decode_layout import apply_decode_layout
from lmforge.model.engine import Engine
from lmforge.model.generation import SamplingParams, generate
from lmforge.model.transformer import Transformer


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


def machine() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        out.append(torch.randint(3, vocab, (length,), generator=g).tolist())
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- CPU figures ------------------------------------------------------------------------------
def cpu_batch1(model: Transformer, model_dir: Path, args, out: Path | None) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = prompts(1, (args.prompt_len, args.prompt_len), model.config.vocab_size)[0]
    n = args.new_tokens
    params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    ids = torch.tensor([prompt])

    def ours():
        return generate(model, prompt, params).token_ids

    def theirs():
        with torch.inference_mode():
            return hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()

    variants = {"lmforge": ours, "transformers": theirs}
    compile_s = None
    if args.compile:  # the engine's static-shape decode step through torch.compile
        # its own copy of the weights: the compiled one-slot engine lays them out row-major for its
        # fused reductions, the eager path above keeps apply_decode_layout's GEMV layout
        from lmforge.model.checkpoint import load_model_dir

        engine = Engine(load_model_dir(model_dir).eval(), num_slots=1, max_len=len(prompt) + n, compile=True)

        def compiled():
            engine.submit(prompt, params)
            tokens = []
            while engine.has_work():
                tokens += [e.token_id for e in engine.step() if e.token_id is not None]
            return tokens

        compile_s = timed(compiled)
        variants["lmforge_compiled"] = compiled
    reference = theirs()
    identical = {name: fn() == reference for name, fn in variants.items()}  # also the warm-up of each
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits every variant
        for name, fn in variants.items():
            runs[name].append(timed(fn))
    tps = {name: n / statistics.median(r) for name, r in runs.items()}
    record = {
        "figure": "cpu_batch1_greedy_decode",
        "preset": args.preset,
        "dtype": "float32",
        "prompt_tokens": len(prompt),
        "new_tokens": n,
        "repeats": args.repeats,
        "lmforge_tokens_per_s": round(tps["lmforge"], 2),
        "transformers_tokens_per_s": round(tps["transformers"], 2),
        "speedup": round(tps["lmforge"] / tps["transformers"], 3),
        "target": 2.0,
    }
    if args.compile:
        record.update(
            {
                "lmforge_compiled_tokens_per_s": round(tps["lmforge_compiled"], 2),
                "compiled_speedup": round(tps["lmforge_compiled"] / tps["transformers"], 3),
                "compile_and_first_run_s": round(compile_s, 1),
            }
        )
    record.update(
        {
            "identical_tokens": identical,
            "runs_s": {k: [round(t, 3) for t in r] for k, r in runs.items()},
            "machine": machine(),
        }
    )
    emit(record, out)


def cpu_engine(model: Transformer, args, out: Path | None) -> None:
    reqs = prompts(
        args.requests, (args.prompt_len // 2, args.prompt_len * 3 // 2), model.config.vocab_size, seed=1
    )
    n = args.new_tokens
    params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    total = len(reqs) * n

    def concurrent():
        engine = Engine(model, num_slots=len(reqs), max_len=max(map(len, reqs)) + n, max_queue=len(reqs))
        for p in reqs:
            engine.submit(p, params)
        produced = 0
        while engine.has_work():
            produced += sum(e.token_id is not None for e in engine.step())
        assert produced == total

    def sequential():
        for p in reqs:
            generate(model, p, params)

    concurrent()  # warm-up
    conc_s, seq_s = [], []
    for _ in range(args.engine_repeats):
        conc_s.append(timed(concurrent))
        seq_s.append(timed(sequential))
    conc_tps, seq_tps = total / statistics.median(conc_s), total / statistics.median(seq_s)
    emit(
        {
            "figure": "cpu_engine_aggregate",
            "preset": args.preset,
            "dtype": "float32",
            "requests": len(reqs),
            "prompt_tokens": [min(map(len, reqs)), max(map(len, reqs))],
            "new_tokens_each": n,
            "repeats": args.engine_repeats,
            "concurrent_tokens_per_s": round(conc_tps, 2),
            "sequential_tokens_per_s": round(seq_tps, 2),
            "speedup": round(conc_tps / seq_tps, 3),
            "target": 5.0,
            "concurrent_runs_s": [round(t, 3) for t in conc_s],
            "sequential_runs_s": [round(t, 3) for t in seq_s],
            "machine": machine(),
        },
        out,
    )


# ---- GPU figure -------------------------------------------------------------------------------
def gpu_batch1(args, out: Path | None) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = Transformer(ModelConfig.from_name(args.preset)).to(dtype).eval()
    model.rotary.reset_tables(device)  # RoPE tables back to fp32 after the cast
    prompt = prompts(1, (args.prompt_len, args.prompt_len), model.config.vocab_size)[0]
    n = args.new_tokens
    params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            # one engine for all runs: its compiled decode step is built (and CUDA graphs recorded) once
            engine = Engine(model, num_slots=1, max_len=len(prompt) + n, compile=compile_)

            def run(engine: Engine = engine) -> None:  # bound now: `engine` changes each iteration
                engine.submit(prompt, params)
                while engine.has_work():
                    engine.step()
                sync()

            run()  # warm-up: compilation, autotuning, graph capture
            warm = time.perf_counter() - start
            runs = [timed(run) for _ in range(args.repeats)]
            tps = n / statistics.median(runs)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            results[name] = tps
            emit(
                {
                    "figure": f"gpu_batch1_greedy_decode_{name}",
                    "preset": args.preset,
                    "dtype": str(dtype).split(".")[-1],
                    "device": str(device),
                    "prompt_tokens": len(prompt),
                    "new_tokens": n,
                    "tokens_per_s": round(tps, 1),
                    "target_tokens_per_s": 700,
                    "peak_memory_gib": round(peak, 3) if peak is not None else None,
                    "setup_s": round(warm, 1),
                    "runs_s": [round(t, 3) for t in runs],
                    "machine": machine(),
                },
                out,
            )
        except Exception as err:  # report the variant that failed and keep the other figures
            emit(
                {"figure": f"gpu_batch1_greedy_decode_{name}", "error": f"{type(err).__name__}: {err}"[:500]},
                out,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="the GPU figure instead of the CPU ones")
    parser.add_argument(
        "--device", default="cuda", help="device for --gpu (cpu only to smoke-test the script)"
    )
    parser.add_argument(
        "--preset", default=None, help="model preset (default: small on CPU, seed-1.3b with --gpu)"
    )
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--engine-repeats", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="CPU: also time the compiled engine (~1 min to compile)"
    )
    parser.add_argument("--only", choices=["batch1", "engine"], default=None, help="run one CPU figure")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        args.preset = args.preset or "seed-1.3b"
        gpu_batch1(args, args.out)
        return 0
    args.preset = args.preset or "small"
    from lmforge.model.checkpoint import save_model_dir

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(args.preset)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model_dir(model, Path(tmp) / "model")  # transformers loads these same weights
        apply_decode_layout(model)  # lmforge's inference layout (same values, faster CPU GEMV)
        if args.only in (None, "batch1"):
            cpu_batch1(model, model_dir, args, args.out)
    if args.only in (None, "engine"):
        cpu_engine(model, args, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
