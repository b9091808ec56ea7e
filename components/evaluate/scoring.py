"""Running a model over a task's items: rolling log-likelihood (perplexity), choice log-likelihoods,
batched generation. Token ids and tensors here; the metrics over text are in `metrics.py`.

Perplexity follows lm-evaluation-harness's rolling log-likelihood: every token of a document is
scored, the first with the bos token (else eos) as its only context. A document longer than the
window is cut into windows that start every `stride` tokens; each scores the tokens no earlier window
scored, with the rest of the window as context (stride == window: disjoint chunks; a smaller stride
gives each token more context at more compute, as in the Hugging Face perplexity guide).
Windows of all documents are sorted by length and run `batch_size` at a time,
right-padded (causal attention: padding after a sequence never changes it).

    windows = rolling_windows(len(doc_ids) + 1, window=512, stride=256)
    nll = document_nlls(model, [[bos, *doc_ids], ...], window=512, stride=256, batch_size=8)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ---- perplexity -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Forward ids[start:end] of one document and score its last `scored` predictions, i.e. the
    tokens ids[end - scored + 1 : end + 1] (position t predicts token t + 1)."""

    doc: int
    start: int
    end: int
    scored: int


def rolling_windows(length: int, window: int, stride: int, doc: int = 0) -> list[Window]:
    """Windows covering every prediction of a sequence of `length` ids (bos included): targets
    1..length-1, each scored exactly once. Windows start every `stride` ids and each scores the
    targets no earlier window scored (the Hugging Face perplexity guide's loop), so stride == window
    is plain chunked evaluation."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got {window}, {stride}")
    targets = length - 1
    out: list[Window] = []
    done = 0  # targets 1..done are scored
    begin = 0
    while done < targets:
        end = min(begin + window, targets)  # forward ids[begin:end], predicting ids[begin+1:end+1]
        out.append(Window(doc, begin, end, end - done))
        done = end
        begin += stride
    return out


@torch.inference_mode()
def document_nlls(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    window: int,
    stride: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood in nats, tokens scored) of each sequence, bos excluded from
    the tokens: sequences are `[bos, *document_ids]`. `on_batch(tokens)` is told the progress."""
    windows = [w for doc, ids in enumerate(sequences) for w in rolling_windows(len(ids), window, stride, doc)]
    windows.sort(key=lambda w: w.end - w.start, reverse=True)  # similar lengths share a batch
    device = next(model.parameters()).device
    nll = [0.0] * len(sequences)
    counts = [0] * len(sequences)
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        width = max(w.end - w.start for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)  # -100: not scored
        for i, w in enumerate(batch):
            seq = sequences[w.doc]
            n = w.end - w.start
            ids[i, :n] = torch.tensor(seq[w.start : w.end])
            targets[i, n - w.scored : n] = torch.tensor(seq[w.end - w.scored + 1 : w.end + 1])
        logits = model(ids.to(device))  # (B, T, V)
        losses = F.cross_entropy(
            logits.float().flatten(0, 1), targets.to(device).flatten(), ignore_index=-100, reduction="none"
        ).view(len(batch), width)
        per_row = losses.sum(-1).tolist()
        for w, loss in zip(batch, per_row, strict=True):
            nll[w.doc] += loss
            counts[w.doc] += w.scored
        if on_batch is not None:
            on_batch(sum(w.scored for w in batch))
    return list(zip(nll, counts, strict=True))


# ---- choice (log-likelihood of continuations) -------------------------------------------------
def continuation_pairs(
    encode: Callable[[str], list[int]], context: str, continuation: str, context_len: int
) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-evaluation-harness splits them: encode the whole text and
    take the continuation as what follows the context's own ids (so a merge across the boundary is
    tokenized as in the whole), trailing context spaces moved to the continuation; the context is
    cut from the left when both do not fit the model."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    # the whole's prefix normally equals the context's ids; when a token merges across the
    # boundary it does not, and the continuation starts after the shared prefix
    shared = 0
    while shared < min(len(ctx), len(whole) - 1) and ctx[shared] == whole[shared]:
        shared += 1
    ctx_ids, cont_ids = whole[:shared], whole[shared:]
    keep = max(1, context_len - len(cont_ids))
    return ctx_ids[-keep:], cont_ids[: context_len - 1]


# ---- generation -------------------------------------------------------------------------------
@dataclass
class Generated:
    text: str
    tokens: int
    time_to_first_token_s: float | None


def generate_texts(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    params,
    stop: Sequence[str],
    batch_size: int,
) -> list[Generated]:
    """Continue every prompt on the continuous-batching engine, `batch_size` sequences at a time; a
    sequence that reaches a stop string is cancelled at once (its slot goes to the next prompt).
    Time to first token is measured from submission, so it includes waiting for a slot."""
    from lmforge.model.engine import Engine
    from lmforge.serving.textgen import TextDecoder

    if not prompts:
        return []
    max_len = min(model.config.max_seq_len, max(len(p) for p in prompts) + params.max_new_tokens)
    engine = Engine(model, num_slots=min(batch_size, len(prompts)), max_len=max_len, max_queue=len(prompts))
    start = time.perf_counter()
    rids = [engine.submit(p, params) for p in prompts]
    decoders = {rid: TextDecoder(tokenizer, p, stop) for rid, p in zip(rids, prompts, strict=True)}
    while engine.has_work():
        for event in engine.step():
            decoder = decoders[event.request_id]
            was_done = decoder.finish_reason is not None
            decoder.feed(event)
            if decoder.finish_reason is not None and not was_done and event.finish_reason is None:
                engine.cancel(event.request_id)  # a stop string: no need to generate further
    out = []
    for rid in rids:
        d = decoders[rid]
        d.finish("length")
        first = d.first_token_at - start if d.first_token_at is not None else None
        out.append(Generated(d.text, len(d.token_ids), first))
    return out
