"""Perplexity scoring throughput: batched windows vs one document at a time, side by side.

The evaluate stage scores every document's rolling windows in batches (windows of all documents
sorted by length, `--batch-size` per forward). This measures tokens scored per second that way
against scoring the same documents one after another, one window per forward, on the same model, and
checks both give the same log-likelihoods. One JSON line per figure on stdout.

Default: a random-weights model of the demo's shape (8192 vocabulary, d_model 256, 4 layers, 512
context; throughput does not depend on the weights' values) over documents with the lengths of
data/eval/heldout.jsonl under the demo tokenizer (bytes / 3.87). `--model DIR` scores that model
directory over heldout.jsonl with its own tokenizer instead.

    python benchmarks/eval_throughput.py                    # ~1 minute on 2 cores
    python benchmarks/eval_throughput.py --doc-tokens 64    # short items (questions, sentences)
    python benchmarks/eval_throughput.py --model out/model --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.components.evaluate.scoring import document_nlls
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "eval" / "heldout.jsonl"
BYTES_PER_TOKEN = 3.87  # the demo tokenizer on heldout.jsonl (configs/gate-demo.yaml)


def documents(model_dir: str | None, vocab_size: int, bos: int) -> list[list[int]]:
    texts = [json.loads(line)["text"] for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line]
    if model_dir:
        from lmforge.tokenizer_files import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        return [[bos, *tokenizer.encode(t, add_special_tokens=False).ids] for t in texts]
    g = torch.Generator().manual_seed(0)
    lengths = [max(1, round(len(t.encode()) / BYTES_PER_TOKEN)) for t in texts]
    return [[bos, *torch.randint(0, vocab_size, (n,), generator=g).tolist()] for n in lengths]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def linear_tokens_per_s(model: torch.nn.Module, rows: int, repeats: int = 5) -> float:
    """Tokens per second through every matrix multiply of the model (each Linear and the output head)
    for `rows` tokens per forward: the work batching could make cheaper. The ratio of this at the
    batched row count to this at one window's row count bounds what batching can gain on this CPU
    (attention, norms and the softmax do not get cheaper per token with more rows either)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    device = weights[0].device
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], device=device, dtype=w.dtype) for w in weights}
    with torch.inference_mode():
        for w in weights:  # warm-up
            inputs[w.shape[1]] @ w.T
        _sync(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                inputs[w.shape[1]] @ w.T
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return rows / best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory (default: random weights, demo shape)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--doc-tokens", type=int, help="cut every document into pieces of this many tokens (many short items)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU figure: gpu_session.sh)")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    if args.model:
        from lmforge.model.checkpoint import load_model_dir

        model = load_model_dir(args.model).eval()
    else:
        cfg = ModelConfig.from_name(
            "tiny",
            vocab_size=8192,
            d_model=256,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            d_ff=704,
            max_seq_len=512,
        )
        model = Transformer(cfg).eval()
    model = model.to(device)
    bos = (
        model.config.bos_token_id if model.config.bos_token_id is not None else model.config.eos_token_id or 0
    )
    docs = documents(args.model, model.config.vocab_size, bos)
    if args.doc_tokens:
        n = args.doc_tokens
        docs = [[bos, *d[i : i + n]] for d in docs for i in range(1, len(d), n)]
    window = model.config.max_seq_len
    tokens = sum(len(d) - 1 for d in docs)

    def batched():
        out = document_nlls(model, docs, window, window, batch_size=args.batch_size)
        _sync(device)
        return out

    def one_at_a_time():
        out = [document_nlls(model, [d], window, window, batch_size=1)[0] for d in docs]
        _sync(device)
        return out

    a, b = batched(), one_at_a_time()  # warm-up, and the two must agree
    for (x, n), (y, m) in zip(a, b, strict=True):
        assert n == m and abs(x - y) <= 1e-3 * max(1.0, abs(y)), (x, y)
    times: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    for _ in range(args.rounds):  # interleaved: machine noise hits both alike
        for name, fn in (("batched", batched), ("one_at_a_time", one_at_a_time)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rates = {k: tokens / statistics.median(v) for k, v in times.items()}
    # the bound: matrix-multiply throughput at one window's mean row count vs the batched row count
    mean_rows = max(1, round(tokens / len(docs)))
    one_rows = min(window, mean_rows)
    ceiling = linear_tokens_per_s(model, one_rows * args.batch_size) / linear_tokens_per_s(model, one_rows)
    record = {
        "figure": "perplexity_scoring_tokens_per_s",
        "documents": len(docs),
        "tokens": tokens,
        "window": window,
        "batch_size": args.batch_size,
        "doc_tokens": args.doc_tokens,
        "batched_tokens_per_s": round(rates["batched"], 1),
        "one_at_a_time_tokens_per_s": round(rates["one_at_a_time"], 1),
        "ratio": round(rates["batched"] / rates["one_at_a_time"], 2),
        "matmul_rows_one_at_a_time": one_rows,
        "matmul_ceiling_ratio": round(ceiling, 2),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
    }
    print(json.dumps(record), flush=True)
    print(
        f"batched is {record['ratio']}x one document at a time; the matrix multiplies alone gain "
        f"{record['matmul_ceiling_ratio']}x from {one_rows} to {one_rows * args.batch_size} rows per call "
        "on this machine (the ceiling for batching here)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
