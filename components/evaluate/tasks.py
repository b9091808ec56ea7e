"""One function per task type: a loaded model + tokenizer and a task's items in, metrics out.

Each returns a `TaskOutcome`: the task's metrics (exactly the keys metrics.json promises), its cost
(throughput, time to first token), per-item samples for samples.jsonl (generate and choice tasks)
and, for perplexity, the (nll, tokens) of every document for the length-bucket plot.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer

from lmforge.components.evaluate.metrics import choice_prediction, generation_metrics
from lmforge.components.evaluate.scoring import continuation_pairs, document_nlls, generate_texts
from lmforge.components.evaluate.suite import SuiteConfig, Task, render_prompt
from lmforge.errors import UserError


@dataclass
class TaskOutcome:
    metrics: dict[str, float]
    cost: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    documents: list[tuple[float, int]] = field(default_factory=list)  # perplexity: (nll, tokens) per doc


def start_token(model: torch.nn.Module, tokenizer: Tokenizer) -> int:
    """The token that stands before a document: bos, else eos (as lm-evaluation-harness does)."""
    from lmforge.serving.textgen import eos_token_ids

    cfg = model.config
    for candidate in (cfg.bos_token_id, cfg.eos_token_id, *eos_token_ids(tokenizer, None)):
        if candidate is not None:
            return int(candidate)
    raise UserError(
        "the model names neither a bos nor an eos token, so a document's first token has no context"
    )


def run_task(
    model: torch.nn.Module, tokenizer: Tokenizer, task: Task, suite: SuiteConfig, batch_size: int
) -> TaskOutcome:
    kind = task.config.type
    if kind == "perplexity":
        return run_perplexity(model, tokenizer, task, suite.window, suite.stride, batch_size)
    if kind == "choice":
        return run_choice(model, tokenizer, task, batch_size)
    return run_generate(model, tokenizer, task, batch_size)


def run_perplexity(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    task: Task,
    window: int | None,
    stride: int | None,
    batch_size: int,
) -> TaskOutcome:
    context = model.config.max_seq_len
    window = window or context
    if window > context:
        raise UserError(f"window={window} exceeds the model's context of {context} tokens")
    stride = stride or window
    bos = start_token(model, tokenizer)
    texts = [item[task.config.text] for item in task.items]
    # the document's own tokens, without the special tokens a post-processor may add: bos is ours
    sequences = [[bos, *tokenizer.encode(t, add_special_tokens=False).ids] for t in texts]
    start = time.perf_counter()
    docs = document_nlls(model, sequences, window, stride, batch_size)
    elapsed = time.perf_counter() - start
    nll = sum(n for n, _ in docs)
    tokens = sum(t for _, t in docs)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    metrics = {
        "perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / (num_bytes * math.log(2)),
        "tokens": tokens,
        "bytes": num_bytes,
        "items": len(texts),
    }
    return TaskOutcome(metrics, {"tokens_per_s": tokens / elapsed, "seconds": elapsed}, documents=docs)


def run_choice(model: torch.nn.Module, tokenizer: Tokenizer, task: Task, batch_size: int) -> TaskOutcome:
    from lmforge.model.generation import score_batch

    cfg = task.config
    assert cfg.prompt is not None and cfg.choices is not None and cfg.answer is not None
    bos = start_token(model, tokenizer)
    context = model.config.max_seq_len

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text).ids

    pairs, spans = [], []
    for item in task.items:
        prompt = render_prompt(cfg.prompt, item)
        first = len(pairs)
        for choice in item[cfg.choices]:
            ctx, cont = continuation_pairs(encode, prompt, cfg.target_delimiter + choice, context)
            pairs.append((ctx or [bos], cont))
        spans.append((first, len(pairs)))
    start = time.perf_counter()
    scores = score_batch(model, pairs, batch_size)
    elapsed = time.perf_counter() - start
    samples, correct, correct_norm = [], 0, 0
    for item, origin, (a, b) in zip(task.items, task.origins, spans, strict=True):
        choices, answer = item[cfg.choices], item[cfg.answer]
        logprobs = [s.logprob for s in scores[a:b]]
        pred, pred_norm = choice_prediction(logprobs, choices)
        correct += pred == answer
        correct_norm += pred_norm == answer
        samples.append(
            {
                "task": task.name,
                "item": origin,
                "prompt": render_prompt(cfg.prompt, item),
                "choices": choices,
                "reference": answer,
                "output": pred,
                "logprobs": logprobs,
                "scores": {"acc": float(pred == answer), "acc_norm": float(pred_norm == answer)},
            }
        )
    n = len(task.items)
    scored = sum(len(c) + len(x) for c, x in pairs)
    metrics = {"acc": correct / n, "acc_norm": correct_norm / n, "items": n}
    return TaskOutcome(metrics, {"tokens_per_s": scored / elapsed, "seconds": elapsed}, samples)


def run_generate(model: torch.nn.Module, tokenizer: Tokenizer, task: Task, batch_size: int) -> TaskOutcome:
    from lmforge.model.generation import SamplingParams
    from lmforge.serving.textgen import encode_prompt, eos_token_ids

    cfg = task.config
    assert cfg.prompt is not None and cfg.target is not None and cfg.metrics is not None
    context = model.config.max_seq_len
    if cfg.max_new_tokens >= context:
        raise UserError(
            f"task {task.name!r}: max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt "
            f"in the model's context of {context} tokens"
        )
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=0,
        stop_token_ids=eos_token_ids(tokenizer, model.config.eos_token_id),
    )
    prompts = [render_prompt(cfg.prompt, item) for item in task.items]
    keep = context - cfg.max_new_tokens  # a long prompt keeps its end, where the question is
    ids = [encode_prompt(tokenizer, p, model.config.bos_token_id)[-keep:] for p in prompts]
    start = time.perf_counter()
    outputs = generate_texts(model, tokenizer, ids, params, cfg.stop, batch_size)
    elapsed = time.perf_counter() - start
    references = [item[cfg.target] for item in task.items]
    metrics, per_item = generation_metrics([o.text for o in outputs], references, cfg.metrics)
    samples = [
        {"task": task.name, "item": origin, "prompt": p, "output": o.text, "reference": r, "scores": s}
        for origin, p, o, r, s in zip(task.origins, prompts, outputs, references, per_item, strict=True)
    ]
    ttfts = [o.time_to_first_token_s for o in outputs if o.time_to_first_token_s is not None]
    generated = sum(o.tokens for o in outputs)
    cost = {"generation_tokens_per_s": generated / elapsed, "seconds": elapsed}
    if ttfts:
        cost["time_to_first_token_s"] = sum(ttfts) / len(ttfts)
    return TaskOutcome({**metrics, "items": len(task.items)}, cost, samples)
