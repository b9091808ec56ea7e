"""Serving LoRA adapters (serving/adapters.py), measured side by side in one run; one JSON line per figure.

The server's design is one merged model per loaded adapter. Its alternative, what peft gives out of
the box, is the base with the LoRA layers left unmerged (B·A·x computed at every decode step). Both
run through the same in-process ModelServer / continuous-batching engine, with the same weights,
the same requests (CONCURRENT prompts of token ids, MAX_TOKENS each, greedy, ignore_eos):

  adapter_decode  aggregate decode tokens/s of adapter requests: merged (lmforge) vs unmerged LoRA
                  (baseline), and vs the base model alone (the merge's cost should be nil)
  adapter_load    seconds to load one adapter on a replica (merge into a fresh copy of the base + start
                  its engine): the cost of an LRU miss

Rounds are interleaved (base, merged, unmerged; then rotated) and the median is reported, so a machine
shared with other work slows every contestant alike.

    python benchmarks/adapter_serving.py                       # `small` preset, ~2 minutes on 2 cores
    python benchmarks/adapter_serving.py --preset tiny --rounds 1    # smoke test
    python benchmarks/adapter_serving.py --device cuda --preset seed-1.3b --rounds 2   # one GPU (bf16)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXTS = [
    "Serving language models over HTTP with continuous batching.",
    "Private domain-specific models for support tickets and manuals.",
    "The quick brown fox jumps over the lazy dog.",
] * 30


def build(root: Path, preset: str) -> tuple[Path, Path]:
    """A random-weights model directory (with a small trained tokenizer) and a LoRA adapter for it
    (r=8 on q/k/v/o, lora_B perturbed so it is not a no-op)."""
    from peft import LoraConfig, get_peft_model

    from lmforge.components.tokenizer import TokenizerInfo, train_tokenizer
    from lmforge.model.checkpoint import load_model_dir, save_model_dir
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    train_tokenizer(
        iter(TEXTS),
        root / "tok",
        vocab_size=400,
        min_frequency=2,
        holdout_fraction=0.0,
        reference_tokenizers=[],
    )
    info = TokenizerInfo.from_dir(root / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        preset,
        vocab_size=info.vocab_size,
        bos_token_id=info.bos_id,
        eos_token_id=info.eos_id,
        pad_token_id=info.pad_id,
    )
    model_dir = save_model_dir(Transformer(cfg).eval(), root / "base", tokenizer_dir=root / "tok")
    peft_model = get_peft_model(
        load_model_dir(model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(root / "adapter", save_embedding_layers=False)
    return model_dir, root / "adapter"


async def run_requests(server, adapter: str | None, prompts: list[list[int]], max_tokens: int) -> int:
    from lmforge.serving.protocol import GenerationRequest

    async def one(i: int, ids: list[int]) -> int:
        request = GenerationRequest(
            f"bench-{adapter}-{i}-{time.monotonic_ns()}",
            prompt=ids,
            max_tokens=max_tokens,
            sampling={"temperature": 0.0, "ignore_eos": True},
            adapter=adapter,
        )
        tokens = 0
        async for event in server.generate(request):
            assert event["type"] != "error", event
            tokens += len(event.get("token_ids", ()))
        return tokens

    return sum(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bfloat16)")
    args = ap.parse_args()

    from peft import PeftModel

    from lmforge.model.checkpoint import load_model_dir
    from lmforge.serving.config import build_serve_config
    from lmforge.serving.model_server import ModelServer

    root = Path(tempfile.mkdtemp(prefix="lmf-adapter-bench-"))
    model_dir, adapter_dir = build(root, args.preset)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    engine = {"num_slots": args.concurrent, "max_queue": 64, "device": args.device, "dtype": dtype}
    cfg = build_serve_config(
        {"model": str(model_dir), "registry_poll_s": 0, "engine": engine, "adapters": {"a": str(adapter_dir)}}
    )
    server = ModelServer(cfg)  # base + the adapter, merged, as `lmforge serve` runs them
    # the baseline: the same adapter unmerged (peft's LoRA layers) in a server of its own
    unmerged_model = PeftModel.from_pretrained(load_model_dir(model_dir), str(adapter_dir)).get_base_model()
    unmerged_model = unmerged_model.to(device=args.device, dtype=getattr(torch, dtype)).eval()
    unmerged_model.rotary.reset_tables(args.device)
    baseline = ModelServer(
        build_serve_config({"model": str(model_dir), "registry_poll_s": 0, "engine": engine})
    )
    from lmforge.serving.runner import ModelRunner

    old = baseline.current
    baseline.current = ModelRunner.load(model_dir, cfg.engine, label="unmerged", model=unmerged_model)
    old.retire()

    vocab = server.current.info.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(5, vocab, (int(torch.randint(16, 48, (1,), generator=g)),), generator=g).tolist()
        for _ in range(args.concurrent)
    ]
    contestants = {
        "base": lambda: run_requests(server, None, prompts, args.max_tokens),
        "adapter_merged": lambda: run_requests(server, "a", prompts, args.max_tokens),
        "adapter_unmerged_lora": lambda: run_requests(baseline, None, prompts, args.max_tokens),
    }
    for fn in contestants.values():  # warm-up (first adapter request loads it)
        asyncio.run(fn())
    rates: dict[str, list[float]] = {k: [] for k in contestants}
    names = list(contestants)
    for r in range(args.rounds):
        for name in names[r % 3 :] + names[: r % 3]:  # rotated each round: no contestant always goes first
            fn = contestants[name]
            start = time.perf_counter()
            tokens = asyncio.run(fn())
            rates[name].append(tokens / (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        json.dumps(
            {
                "figure": "adapter_decode",
                "preset": args.preset,
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                "concurrent": args.concurrent,
                "max_tokens": args.max_tokens,
                "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
                "merged_vs_unmerged": round(med["adapter_merged"] / med["adapter_unmerged_lora"], 3),
                "merged_vs_base": round(med["adapter_merged"] / med["base"], 3),
                "load_avg": os.getloadavg(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )

    loads = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        server.load_adapter("a").close()
        loads.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "figure": "adapter_load",
                "preset": args.preset,
                "seconds_median": round(statistics.median(loads), 3),
                "seconds": [round(x, 3) for x in loads],
                "load_avg": os.getloadavg(),
            }
        ),
        flush=True,
    )
    server.close()
    baseline.close()


if __name__ == "__main__":
    main()
