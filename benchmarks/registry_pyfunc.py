"""A registered model's MLflow pyfunc `predict` on N rows: the lmforge engine (rows batched together)
vs a naive pyfunc that generates row after row (`generate_text` per prompt), side by side.

    python benchmarks/registry_pyfunc.py --preset tiny --rows 16 --max-tokens 32 --rounds 3

Also prints the registration time (log the model directory + MLmodel, create the version) and the
`mlflow.pyfunc.load_model` time. One JSON line per figure. Random weights: tokens/s only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def build_model(root: Path, preset: str) -> Path:
    import torch

    from lmforge.components.tokenizer import train_tokenizer
    from lmforge.model.checkpoint import save_model_dir
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    texts = [
        f"Support ticket {i}: the printer on floor {i % 7} fails to connect to the network."
        for i in range(400)
    ]
    train_tokenizer(
        iter(texts),
        root / "tok",
        vocab_size=512,
        min_frequency=2,
        holdout_fraction=0.0,
        reference_tokenizers=[],
    )
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        preset, vocab_size=512, max_seq_len=256, init_std=0.3
    )  # peaked logits: no near-ties
    return save_model_dir(Transformer(cfg).eval(), root / "model", tokenizer_dir=root / "tok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import mlflow.pyfunc
    import pandas as pd
    import torch

    from lmforge.model.checkpoint import load_model_dir
    from lmforge.model.generation import SamplingParams
    from lmforge.registry import RegistryClient
    from lmforge.serving.textgen import generate_text, model_tokenizer

    root = Path(tempfile.mkdtemp(prefix="lmforge-bench-registry-"))
    model_dir = build_model(root, args.preset)
    client = RegistryClient(f"sqlite:///{root / 'mlflow.db'}")
    client.register_model_dir(model_dir, "warmup")  # the first registration also creates the database
    start = time.perf_counter()
    client.register_model_dir(model_dir, "bench", alias="champion")
    print(json.dumps({"figure": "register_model_dir_s", "value": round(time.perf_counter() - start, 2)}))
    mlflow.set_tracking_uri(client.tracking_uri)
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model("models:/bench@champion")
    print(json.dumps({"figure": "pyfunc_load_model_s", "value": round(time.perf_counter() - start, 2)}))

    prompts = [f"Support ticket {i}: the printer" for i in range(args.rows)]
    params = {"max_tokens": args.max_tokens, "temperature": 0.0}
    naive_model = load_model_dir(model_dir)
    tokenizer = model_tokenizer(model_dir, naive_model.config.vocab_size)
    sampling = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0)

    def lmforge_predict() -> list[str]:
        return model.predict(pd.DataFrame({"prompt": prompts}), params=params)

    def naive_predict() -> list[str]:
        return [generate_text(naive_model, tokenizer, p, sampling).text for p in prompts]

    # the same greedy text, except where batched fp32 arithmetic flips a near-tie of the random model
    same = sum(a == b for a, b in zip(lmforge_predict(), naive_predict(), strict=True))
    print(json.dumps({"figure": "rows_with_identical_text", "value": same, "of": args.rows}))
    times: dict[str, list[float]] = {"lmforge": [], "naive": []}
    for _ in range(args.rounds):
        for name, fn in (("naive", naive_predict), ("lmforge", lmforge_predict)):
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            times[name].append(time.perf_counter() - start)
    tokens = args.rows * args.max_tokens
    best = {k: min(v) for k, v in times.items()}
    for name, t in best.items():
        print(
            json.dumps(
                {
                    "figure": f"pyfunc_predict_{name}",
                    "tokens_per_s": round(tokens / t, 1),
                    "best_s": round(t, 3),
                    "median_s": round(statistics.median(times[name]), 3),
                }
            )
        )
    print(
        json.dumps(
            {
                "figure": "speedup_lmforge_vs_naive",
                "value": round(best["naive"] / best["lmforge"], 2),
                "rows": args.rows,
                "max_tokens": args.max_tokens,
                "preset": args.preset,
                "loadavg": os.getloadavg()[0],
                "python": sys.version.split()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
