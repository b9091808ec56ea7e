"""Text generation over token ids: sampling parameters, logits processors, `generate`, `stream`, `score`.

Everything here works on token ids and tensors; turning text into ids and back (stop strings,
incremental detokenization) happens at the edges, in `serving/textgen.py`.

How a token is chosen for one sequence (`TokenChooser.choose`), in this order:
  raw logits -> repetition / frequency / presence penalties -> constraint mask -> temperature
  -> top-k -> top-p -> min-p -> sample with the sequence's own torch.Generator (or argmax if
  temperature == 0).
Log-probabilities reported to the caller are those of the raw model distribution (log-softmax of
the logits before any processing), so they mean the same thing whatever the sampling settings.

`generate` and `stream` run the continuous-batching engine (`model/engine.py`) with just enough
slots for the request, so one code path serves the CLI, evaluation and the HTTP server.

    from lmforge.model.generation import SamplingParams, generate
    out = generate(model, prompt_ids, SamplingParams(max_new_tokens=32, temperature=0))
    out.completions[0].token_ids
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lmforge.model.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from lmforge.model.constrained import TokenConstraint
    from lmforge.model.engine import Engine
    from lmforge.model.transformer import CausalLM

MAX_LOGPROBS = 20  # top alternatives per token; more is rarely useful and costs a sort per step


class SamplingParamsError(ConfigError):
    """A sampling parameter is invalid; the message names the field and the allowed range."""


# ---- parameters -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. Validated on construction: a bad value fails before any work."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p; 1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely token); 0 = off
    repetition_penalty: float = 1.0  # CTRL-style, on every token of prompt + output; 1 = off
    frequency_penalty: float = 0.0  # OpenAI-style: logit -= f * count in the output so far
    presence_penalty: float = 0.0  # OpenAI-style: logit -= p if the token occurred in the output
    n: int = 1  # independent samples sharing one prefill of the prompt
    seed: int | None = None  # sample i of a request uses torch.Generator seeded with seed + i
    stop_token_ids: tuple[int, ...] = ()  # finish when one is produced (it is kept in the output)
    ignore_eos: bool = False  # do not stop at the model's eos token (benchmarks, fixed lengths)
    logprobs: int | None = None  # None = off; k = chosen token's logprob + the k most likely tokens

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise SamplingParamsError(f"sampling.{name} {rule}, got {getattr(self, name)!r}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if isinstance(self.stop_token_ids, list):  # e.g. from JSON; kept as a tuple (hashable, frozen)
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            fail("max_new_tokens", "must be an integer >= 1")
        if (
            not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            fail("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1] (1 = off)")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1] (0 = off)")
        if not isinstance(self.repetition_penalty, (int, float)) or not (
            0 < self.repetition_penalty < math.inf
        ):
            fail("repetition_penalty", "must be a finite number > 0 (1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2 <= value <= 2:
                fail(name, "must be in [-2, 2] (0 = off)")
        if not is_int(self.n) or self.n < 1:
            fail("n", "must be an integer >= 1 (the number of samples)")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            fail("seed", "must be None or an integer >= 0")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            fail("stop_token_ids", "must be a list of token ids >= 0")
        if self.logprobs is not None and (
            not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            fail("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def check_request(self, prompt_len: int, context_len: int, vocab_size: int) -> None:
        """Reject a request this model cannot serve, before it takes a slot."""
        if prompt_len < 1:
            raise SamplingParamsError("the prompt is empty: give at least one token (e.g. the bos token)")
        if prompt_len + self.max_new_tokens > context_len:
            raise SamplingParamsError(
                f"sampling.max_new_tokens={self.max_new_tokens} plus the prompt's {prompt_len} tokens "
                f"exceeds the context of {context_len} tokens; "
                f"lower max_new_tokens to at most {max(context_len - prompt_len, 0)}"
            )
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise SamplingParamsError(
                f"sampling.stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})"
            )


# ---- logits processors (pure functions over (..., V) logits) ---------------------------------
def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,  # (..., V) how often each token occurs in the output so far
    seen: torch.Tensor,  # (..., V) bool: token occurs in the prompt or the output
    repetition: float,
    frequency: float,
    presence: float,
) -> torch.Tensor:
    """Repetition penalty divides positive / multiplies negative logits of seen tokens (CTRL,
    as Hugging Face does); frequency and presence penalties subtract, as the OpenAI API does."""
    if repetition != 1.0:
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
    if frequency != 0.0 or presence != 0.0:
        counts = output_counts.to(logits.dtype)
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value are kept), the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens before it already reach p (the most likely one always stays)
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, -math.inf)


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p: the distribution sampling draws from (as logits)."""
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def new_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one sequence. Without a seed, one is drawn from torch's global RNG, so
    `torch.manual_seed` still makes a whole program reproducible."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# ---- choosing one token per sequence ---------------------------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # under the raw model distribution
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob) of the most likely tokens, best first


class TokenChooser:
    """Per-sequence sampling state: its parameters, generator, penalty counts and constraint."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        vocab_size: int,
        device: torch.device | str = "cpu",
        sample_index: int = 0,
        constraint: TokenConstraint | None = None,
    ) -> None:
        self.params = params
        self.constraint = constraint
        self.generator = (
            None
            if params.greedy
            else new_generator(None if params.seed is None else params.seed + sample_index, device)
        )
        # penalty state, both set or both None
        self.output_counts: torch.Tensor | None = None  # (V,) int32
        self.seen: torch.Tensor | None = None  # (V,) bool: in the prompt or the output so far
        if params.penalized:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True

    @property
    def plain_greedy(self) -> bool:
        """True when argmax of the raw logits is the whole decision (the batched fast path)."""
        p = self.params
        return p.greedy and not p.penalized and self.constraint is None and p.logprobs is None

    def choose(self, logits: torch.Tensor, generated: Sequence[int]) -> TokenLogprob | None:
        """Pick the next token from raw logits (V,); None when the constraint allows nothing more."""
        p = self.params
        logits = logits.float()
        processed = logits
        if self.output_counts is not None and self.seen is not None:
            processed = apply_penalties(
                processed,
                self.output_counts,
                self.seen,
                p.repetition_penalty,
                p.frequency_penalty,
                p.presence_penalty,
            )
        if self.constraint is not None:
            allowed = self.constraint.allowed_tokens(generated)
            if allowed is not None:
                if not bool(allowed.any()):
                    return None
                processed = processed.masked_fill(~allowed.to(processed.device), -math.inf)
        if p.greedy:
            token = int(processed.argmax())
        else:
            probs = warp_logits(processed, p).softmax(dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.output_counts is not None and self.seen is not None:
            self.output_counts[token] += 1
            self.seen[token] = True
        return self._logprob(logits, token)

    def _logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        if self.params.logprobs is None:
            return TokenLogprob(token, math.nan)
        logprobs = logits.log_softmax(dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if self.params.logprobs > 0:
            values, ids = torch.topk(logprobs, self.params.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprob(token, float(logprobs[token]), top)


# ---- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenEvent:
    """One step of one sequence, as streamed: a new token and/or the end of the sequence."""

    request_id: str
    index: int  # which of the request's n samples
    token_id: int | None  # None for an event that only finishes the sequence (cancelled, constrained)
    logprob: TokenLogprob | None = None  # set when the request asked for logprobs
    finish_reason: str | None = None  # None while running; "stop", "length", "cancelled"


@dataclass
class Completion:
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class GenerationOutput:
    request_id: str
    prompt_ids: list[int]
    completions: list[Completion]

    @property
    def token_ids(self) -> list[int]:
        """The first (or only) sample's tokens."""
        return self.completions[0].token_ids


def collect(events: Iterator[TokenEvent], outputs: dict[str, GenerationOutput]) -> None:
    """Fold streamed events into the outputs they belong to."""
    for event in events:
        completion = outputs[event.request_id].completions[event.index]
        if event.token_id is not None:
            completion.token_ids.append(event.token_id)
            if event.logprob is not None and not math.isnan(event.logprob.logprob):
                completion.logprobs = (completion.logprobs or []) + [event.logprob]
        if event.finish_reason is not None:
            completion.finish_reason = event.finish_reason


# ---- generate / stream (thin wrappers over the engine) ---------------------------------------
def _engine_for(
    model: CausalLM, prompts: Sequence[Sequence[int]], params: SamplingParams, **engine_kwargs: Any
) -> Engine:
    from lmforge.model.engine import Engine  # the engine builds on this module

    context = model.config.max_seq_len
    for prompt in prompts:
        params.check_request(len(prompt), context, model.config.vocab_size)
    max_len = max(len(p) for p in prompts) + params.max_new_tokens
    return Engine(
        model, num_slots=len(prompts) * params.n, max_len=max_len, max_queue=len(prompts), **engine_kwargs
    )


def stream(
    model: CausalLM,
    prompt_ids: Sequence[int],
    params: SamplingParams | None = None,
    constraint: TokenConstraint | None = None,
    **engine_kwargs: Any,
) -> Iterator[TokenEvent]:
    """Yield token events for one prompt as they are produced. Closing the generator stops the work."""
    params = params or SamplingParams()
    engine = _engine_for(model, [prompt_ids], params, **engine_kwargs)
    engine.submit(prompt_ids, params, constraint=constraint)
    while engine.has_work():
        yield from engine.step()


def generate_batch(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    constraint: TokenConstraint | None = None,
    **engine_kwargs: Any,
) -> list[GenerationOutput]:
    """Continue several prompts together (each prompt's result equals running it alone)."""
    params = params or SamplingParams()
    if not prompts:
        return []
    engine = _engine_for(model, prompts, params, **engine_kwargs)
    ids = [engine.submit(p, params, constraint=constraint) for p in prompts]
    outputs = {
        rid: GenerationOutput(rid, list(p), [Completion(i) for i in range(params.n)])
        for rid, p in zip(ids, prompts, strict=True)
    }
    while engine.has_work():
        collect(iter(engine.step()), outputs)
    return [outputs[rid] for rid in ids]


def generate(
    model: CausalLM,
    prompt_ids: Sequence[int],
    params: SamplingParams | None = None,
    constraint: TokenConstraint | None = None,
    **engine_kwargs: Any,
) -> GenerationOutput:
    """Continue one prompt; `params.n` samples share its prefill."""
    return generate_batch(model, [prompt_ids], params, constraint, **engine_kwargs)[0]


# ---- scoring --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreResult:
    logprob: float  # sum of the continuation's token log-probabilities
    token_logprobs: tuple[float, ...]
    is_greedy: bool  # every continuation token was the argmax (exact-match style evaluations)


@torch.inference_mode()
def score_batch(
    model: CausalLM,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
) -> list[ScoreResult]:
    """Log-likelihood of each continuation given its context (one forward per batch, no cache).

    Sequences are right-padded: causal attention means padding after a sequence never changes it.
    """
    context_len = model.config.max_seq_len
    results: list[ScoreResult] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = []
        for i, (ctx, cont) in enumerate(chunk, start):
            if len(ctx) < 1 or len(cont) < 1:
                raise ValueError(f"pair {i}: context and continuation must each hold at least one token")
            if len(ctx) + len(cont) > context_len:
                raise ValueError(
                    f"pair {i}: {len(ctx) + len(cont)} tokens exceed the model's context of {context_len}"
                )
            rows.append(list(ctx) + list(cont))
        width = max(len(r) for r in rows)
        device = next(model.parameters()).device
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        logprobs = F.log_softmax(model(ids).float(), dim=-1)  # (B, T, V)
        for i, (ctx, cont) in enumerate(chunk):
            # the logits at position t predict token t + 1
            steps = logprobs[i, len(ctx) - 1 : len(ctx) + len(cont) - 1]  # (len(cont), V)
            target = torch.tensor(list(cont), dtype=torch.long, device=device)
            token_lp = steps.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            greedy = bool((steps.argmax(-1) == target).all())
            results.append(ScoreResult(float(token_lp.sum()), tuple(token_lp.tolist()), greedy))
    return results


def score(model: CausalLM, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> ScoreResult:
    """Log-likelihood of `continuation_ids` following `context_ids`."""
    return score_batch(model, [(context_ids, continuation_ids)])[0]
