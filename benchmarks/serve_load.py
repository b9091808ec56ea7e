"""HTTP load against the served model vs. the same engine called in-process.

Starts Ray Serve on 127.0.0.1 (or targets --url), fires streaming /v1/completions requests at
concurrency 1, 8 and 32 with an async HTTP client, and records throughput, p50/p95 latency and
p50/p95 time to first token (TTFT), plus failed requests. Then runs the identical workload on an
`EngineDriver` in this process (same model, slots and queue; requests submitted concurrently with
asyncio), so the difference between the two is the cost of HTTP + JSON + SSE + Ray Serve's hops.

The highest concurrency (32) stays within the engine's slots + queue (8 + 32): every request must
succeed. An extra "overload" burst beyond slots + queue + Serve's max_queued_requests shows the
503 + Retry-After answers instead.

    python benchmarks/serve_load.py                       # a random "small"-shaped model, local Ray Serve
    python benchmarks/serve_load.py --model out/model     # your model directory
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model-id bot --api-key $KEY
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


@dataclass
class Row:
    mode: str  # "http" or "in-process"
    concurrency: int
    requests: int
    failed: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    ttft_p50_ms: float
    ttft_p95_ms: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(mode, concurrency, results, seconds) -> Row:
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] * 1000 for r in ok]
    ttft = [r["ttft"] * 1000 for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return Row(
        mode,
        concurrency,
        len(results),
        len(results) - len(ok),
        round(seconds, 3),
        round(len(ok) / seconds, 2),
        round(tokens / seconds, 1),
        round(percentile(lat, 0.5), 1),
        round(percentile(lat, 0.95), 1),
        round(percentile(ttft, 0.5), 1),
        round(percentile(ttft, 0.95), 1),
    )


# ---- the model --------------------------------------------------------------------------------------
def build_model_dir(out: Path, preset: str, context: int) -> Path:
    """A random-weights model of the preset's shape with a tokenizer trained on the bundled sample."""
    import torch

    from lmforge.components.tokenizer import TokenizerInfo, train_tokenizer
    from lmforge.model.checkpoint import save_model_dir
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    train_tokenizer(
        [REPO_ROOT / "data" / "sample"],
        out / "tokenizer",
        vocab_size=4096,
        holdout_fraction=0.0,
        reference_tokenizers=[],
    )
    info = TokenizerInfo.from_dir(out / "tokenizer")
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        preset,
        vocab_size=info.vocab_size,
        max_seq_len=context,
        bos_token_id=info.bos_id,
        eos_token_id=info.eos_id,
        pad_token_id=info.pad_id,
    )
    return save_model_dir(Transformer(cfg).eval(), out / f"{preset}-random", tokenizer_dir=out / "tokenizer")


def prompts_for(n: int) -> list[str]:
    topics = [
        "the billing system",
        "a failed deployment",
        "the vacation policy",
        "a database migration",
        "the onboarding checklist",
        "an outage report",
        "the API rate limits",
        "a customer refund",
    ]
    return [
        f"Ticket {i}: please summarize {topics[i % len(topics)]} for the support team in two sentences."
        for i in range(n)
    ]


# ---- HTTP load ----------------------------------------------------------------------------------------
async def http_request(client, url, headers, model_id, prompt, max_tokens) -> dict:
    body = {
        "model": model_id,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, tokens, status = None, 0, 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
                return {
                    "ok": False,
                    "status": status,
                    "latency": time.perf_counter() - start,
                    "ttft": None,
                    "tokens": 0,
                }
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if ttft is None and event["choices"]:
                    ttft = time.perf_counter() - start
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except Exception as err:  # a failed request is a data point, not a crash
        return {
            "ok": False,
            "status": repr(err),
            "latency": time.perf_counter() - start,
            "ttft": None,
            "tokens": 0,
        }
    return {
        "ok": tokens == max_tokens,
        "status": status,
        "latency": time.perf_counter() - start,
        "ttft": ttft,
        "tokens": tokens,
    }


async def http_level(url, headers, model_id, concurrency, total, max_tokens) -> tuple[list[dict], float]:
    import httpx

    prompts = prompts_for(total)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def one(p):
            async with sem:
                return await http_request(client, url, headers, model_id, p, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return results, time.perf_counter() - start


# ---- in-process load ---------------------------------------------------------------------------------
async def engine_level(driver, tokenizer, bos_id, concurrency, total, max_tokens) -> tuple[list[dict], float]:
    from lmforge.model.generation import SamplingParams
    from lmforge.serving.textgen import encode_prompt

    sem = asyncio.Semaphore(concurrency)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one(prompt):
        async with sem:
            start = time.perf_counter()
            ttft, tokens = None, 0
            ids = encode_prompt(tokenizer, prompt, bos_id)
            async for event in driver.submit(ids, params):
                if event.token_id is not None:
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
                tokenizer.decode([event.token_id or 0])  # the detokenization the server also does
            return {
                "ok": tokens == max_tokens,
                "latency": time.perf_counter() - start,
                "ttft": ttft,
                "tokens": tokens,
            }

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts_for(total)))
    return results, time.perf_counter() - start


def run_in_process(model_dir, num_slots, max_queue, levels, max_tokens) -> list[Row]:
    from lmforge.model.checkpoint import load_model_dir
    from lmforge.model.engine import Engine, EngineDriver
    from lmforge.tokenizer_files import load_tokenizer

    model = load_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)
    rows = []
    with EngineDriver(Engine(model, num_slots=num_slots, max_queue=max_queue)) as driver:
        asyncio.run(engine_level(driver, tokenizer, model.config.bos_token_id, 1, 2, max_tokens))  # warm-up
        for concurrency, total in levels:
            results, seconds = asyncio.run(
                engine_level(driver, tokenizer, model.config.bos_token_id, concurrency, total, max_tokens)
            )
            rows.append(summarize("in-process", concurrency, results, seconds))
            print(json.dumps(asdict(rows[-1])), flush=True)
    return rows


# ---- main ---------------------------------------------------------------------------------------------
def start_serve(model_dir: str, num_slots: int, max_queue: int, max_queued: int) -> str:
    import ray
    from ray import serve

    from lmforge.serving.app import build_app
    from lmforge.serving.config import build_serve_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    )
    cfg = build_serve_config(
        {
            "model": model_dir,
            "port": port,
            "registry_poll_s": 0,
            "num_cpus": 0,
            "router_num_cpus": 0,
            "max_queued_requests": max_queued,
            "engine": {"num_slots": num_slots, "max_queue": max_queue},
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="lmforge", route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}"


def markdown(rows: list[Row], overload: dict | None, meta: dict) -> str:
    lines = [
        f"Model: {meta['model']} ({meta['params']}), {meta['max_tokens']} new tokens per request (streamed, "
        f"greedy, ignore_eos), engine {meta['num_slots']} slots + queue {meta['max_queue']}, "
        f"Serve max_queued_requests {meta['max_queued']}. "
        f"Machine: {meta['machine']}.",
        "",
        "| mode | concurrency | requests | failed | req/s | tokens/s | latency p50 ms | latency p95 ms | "
        "TTFT p50 ms | TTFT p95 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.concurrency} | {r.requests} | {r.failed} | {r.requests_per_s} | "
            f"{r.tokens_per_s} | {r.latency_p50_ms} | {r.latency_p95_ms} | "
            f"{r.ttft_p50_ms} | {r.ttft_p95_ms} |"
        )
    by = {(r.mode, r.concurrency): r for r in rows}
    lines.append("")
    for c in sorted({r.concurrency for r in rows}):
        h, e = by.get(("http", c)), by.get(("in-process", c))
        if h and e and h.tokens_per_s:
            lines.append(
                f"- concurrency {c}: HTTP/Serve reaches {h.tokens_per_s / e.tokens_per_s:.0%} of the "
                f"in-process token throughput; TTFT p50 {h.ttft_p50_ms - e.ttft_p50_ms:+.0f} ms."
            )
    if overload:
        lines.append(
            f"- overload burst of {overload['requests']} concurrent requests (> slots + queue): "
            f"{overload['ok']} served, {overload['rejected_503']} answered 503 + Retry-After, "
            f"{overload['other_failures']} other failures."
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a random model of --preset's shape)")
    ap.add_argument("--preset", default="small", help="shape of the random default model (default: small)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--url", help="an already running server (default: start Ray Serve here)")
    ap.add_argument("--model-id", help="the served model id (with --url)")
    ap.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"))
    ap.add_argument("--num-slots", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument(
        "--max-queued",
        type=int,
        default=16,
        help="requests waiting at the router once the replica holds slots + queue "
        "(Serve max_queued_requests)",
    )
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--levels", default="1:8,8:32,32:64", help="concurrency:requests pairs")
    ap.add_argument("--no-overload", action="store_true", help="skip the burst beyond the queue limit")
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    levels = [tuple(int(x) for x in pair.split(":")) for pair in args.levels.split(",")]

    tmp = tempfile.TemporaryDirectory(prefix="lmforge-serve-bench-")
    model_dir = args.model or str(build_model_dir(Path(tmp.name), args.preset, args.context))
    from lmforge.model.checkpoint import read_config

    mcfg = read_config(model_dir)
    url = args.url or start_serve(model_dir, args.num_slots, args.max_queue, args.max_queued)
    model_id = args.model_id or Path(model_dir).name
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    import httpx

    deadline = time.monotonic() + 300
    while httpx.get(f"{url}/ready", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "server not ready"
        time.sleep(0.5)

    rows: list[Row] = []
    asyncio.run(http_level(url, headers, model_id, 1, 2, args.max_tokens))  # warm-up
    for concurrency, total in levels:
        results, seconds = asyncio.run(
            http_level(url, headers, model_id, concurrency, total, args.max_tokens)
        )
        rows.append(summarize("http", concurrency, results, seconds))
        print(json.dumps(asdict(rows[-1])), flush=True)
    overload = None
    if not args.no_overload and not args.url:
        burst = args.num_slots + args.max_queue + args.max_queued + 24
        results, _ = asyncio.run(http_level(url, headers, model_id, burst, burst, args.max_tokens * 2))
        overload = {
            "requests": burst,
            "ok": sum(r["ok"] for r in results),
            "rejected_503": sum(r["status"] == 503 for r in results),
            "other_failures": sum(not r["ok"] and r["status"] != 503 for r in results),
        }
        print(json.dumps({"overload": overload}), flush=True)
    if not args.url:
        from ray import serve

        serve.shutdown()  # free the CPU for the in-process run
    rows += run_in_process(model_dir, args.num_slots, args.max_queue, levels, args.max_tokens)

    meta = {
        "model": Path(model_dir).name,
        "params": f"{mcfg.num_params() / 1e6:.1f}M parameters",
        "max_tokens": args.max_tokens,
        "num_slots": args.num_slots,
        "max_queue": args.max_queue,
        "max_queued": args.max_queued,
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, torch CPU",
    }
    table = markdown(rows, overload, meta)
    print(table)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    tmp.cleanup()
    return 0 if all(r.failed == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
