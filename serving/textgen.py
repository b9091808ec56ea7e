"""Text in, text out around the token-level generation in `model/`.

`model/` works on token ids only; this module owns everything that needs text:
- `IncrementalDetokenizer`: turns a stream of token ids into text deltas and never emits a
  broken multi-byte character (a byte-level token may hold half of one; its text waits for the rest),
- `StopStrings`: ends the output at the first stop string, holding back text that might be the
  start of one so that a stop string split across tokens is never shown,
- `TextDecoder`: both together, one per sequence; `decode_events` is the one loop from the
  engine's token events to text (used by `lmforge generate`, `generate_text` / `stream_text` and,
  event by event through `TextDecoder.feed`, by the serving runner),
- `encode_prompt`: a prompt's ids exactly as the model's own tokenizer encodes it,
- `RegexConstraint`: constrained decoding, the output must match a regular expression,
- `generate_text` / `stream_text` (a model in memory) and `generate_from_dir` (what
  `lmforge generate` runs: load a model directory, pick beam search / speculative / sampling).

Tokenizers are Hugging Face `tokenizers.Tokenizer` objects (the model directory's tokenizer.json).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
from tokenizers import Tokenizer

from lmforge.errors import UserError
from lmforge.model.beam_search import BeamSearchParams, beam_search
from lmforge.model.decode_layout import apply_decode_layout
from lmforge.model.generation import SamplingParams, TokenEvent, stream
from lmforge.tokenizer_files import load_tokenizer

REPLACEMENT_CHAR = "\ufffd"  # what decoding yields for an incomplete UTF-8 sequence
EOS_TOKEN_NAMES = ("<|eos|>", "<|endoftext|>", "</s>", "<|end_of_text|>")


def model_tokenizer(model_dir: str | Path, vocab_size: int) -> Tokenizer:
    """A model directory's tokenizer, refused when its ids do not fit the model's embedding."""
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.get_vocab_size() > vocab_size:
        raise UserError(
            f"{model_dir}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
            f"{vocab_size}; they do not belong together"
        )
    return tokenizer


def encode_prompt(
    tokenizer: Tokenizer, text: str, bos_token_id: int | None = None, *, add_special_tokens: bool = True
) -> list[int]:
    """Token ids of a prompt, exactly as the model's own tokenizer encodes it.

    The tokenizer's post-processor (in tokenizer.json) decides which special tokens frame a text:
    Llama 3's adds its bos, SmolLM2's and lmforge's add none. `transformers` (>= 5) encodes the same
    way (it ignores `add_bos_token` in tokenizer_config.json when tokenizer.json is there), so an
    imported model sees the ids it was trained on and greedy output matches transformers token for
    token. A rendered chat template spells out its own special tokens: encode it with
    add_special_tokens=False, as transformers' `apply_chat_template` does. `bos_token_id` is used
    only for an empty prompt, which otherwise leaves nothing to continue."""
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
    if not ids and bos_token_id is not None:
        ids = [bos_token_id]
    if not ids:
        raise UserError("the prompt is empty and the model has no bos token to start from")
    return ids


def eos_token_ids(tokenizer: Tokenizer, model_eos: int | None) -> tuple[int, ...]:
    """The model's eos id, else the tokenizer's conventional end-of-text token (if any)."""
    if model_eos is not None:
        return (model_eos,)
    for name in EOS_TOKEN_NAMES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return (token_id,)
    return ()


# ---- incremental detokenization -------------------------------------------------------------
class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids.

    Decodes a short window (a few already-emitted tokens for context, then the new ones) and
    emits only what the new tokens add, once it no longer ends in U+FFFD (an unfinished UTF-8
    sequence). Context matters because some decoders render a token differently at the start of
    a string (e.g. a leading space)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        context: int = 5,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-context:]) if context else []
        self.prefix_offset = 0  # window start: context tokens whose text is already accounted for
        self.read_offset = len(self.ids)  # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still incomplete
        delta = text[len(prefix) :]
        # the new tokens become the next context; drop ids no longer needed
        self.ids = self.ids[self.read_offset :]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        return delta

    def flush(self) -> str:
        """At the end: whatever is still held back (an unfinished character shows as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.ids = self.ids[len(self.ids) :]
        self.prefix_offset = self.read_offset = 0
        return text[len(prefix) :] if len(text) > len(prefix) else ""


class StopStrings:
    """Cut the output at the first occurrence of any stop string (the stop string is not emitted)."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(stops)
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise UserError(f"stop strings must be non-empty strings, got {list(self.stops)!r}")
        self.buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of the text so far that is safe to show now."""
        if self.stopped:
            return ""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[: min(hits)], "", True
            return out
        hold = self._held_back()
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(out) :]
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the buffer that could begin a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.buffer)), longest, -1):
                if self.buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


class TextDecoder:
    """Token ids in, safe text deltas out, for one sequence: detokenization + stop strings.

    `feed` takes the engine's token events and `decode_events` is the one loop over them: the CLI,
    `generate_text` / `stream_text` and the serving runner all turn events into text through these,
    so a stop string, the held-back tail and the finish reason mean the same thing everywhere."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), stop: Iterable[str] = ()
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = StopStrings(stop)
        self.text = ""  # everything emitted so far
        self.token_ids: list[int] = []  # every token pushed, the one that completed a stop string included
        self.finish_reason: str | None = None  # set by `finish`: "stop", "length", "cancelled"
        self.first_token_at: float | None = None  # time.perf_counter() when the first token arrived

    @property
    def stopped(self) -> bool:
        """A stop string was reached: nothing more is shown."""
        return self.stop.stopped

    def push(self, token_id: int) -> str:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.token_ids.append(token_id)
        delta = self.stop.push(self.detokenizer.push(token_id))
        self.text += delta
        return delta

    def feed(self, event: TokenEvent) -> str:
        """One engine event in, the text it makes safe to show out. When the sequence ends here (a stop
        string: reason "stop"; else the event's finish reason) the held-back text comes out too."""
        if self.finish_reason is not None:
            return ""
        delta = self.push(event.token_id) if event.token_id is not None else ""
        reason = "stop" if self.stopped else event.finish_reason
        return delta + self.finish(reason) if reason is not None else delta

    def finish(self, reason: str = "length") -> str:
        """End the sequence: the text still held back (none after a stop string). Later calls do nothing."""
        if self.finish_reason is not None:
            return ""
        self.finish_reason = "stop" if self.stopped else reason
        delta = self.stop.push(self.detokenizer.flush()) if not self.stopped else ""
        delta += self.stop.flush()
        self.text += delta
        return delta


def decode_events(events: Iterable[TokenEvent], decoder: TextDecoder) -> Iterator[str]:
    """The token-events-to-text loop: text deltas of one sequence until it finishes or reaches a stop
    string. The event stream is closed then (or when the consumer stops early), so a generator stops its
    engine and nothing is decoded past a stop string; a stream that just ends finishes as "length"."""
    try:
        for event in events:
            delta = decoder.feed(event)
            if delta:
                yield delta
            if decoder.finish_reason is not None:
                break
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    tail = decoder.finish("length")
    if tail:
        yield tail


def token_events(token_ids: Sequence[int], finish_reason: str) -> Iterator[TokenEvent]:
    """Events of a finished sequence (beam search, speculative decoding); the last carries the reason."""
    for n, token_id in enumerate(token_ids, 1):
        yield TokenEvent("", 0, token_id, finish_reason=finish_reason if n == len(token_ids) else None)
    if not token_ids:
        yield TokenEvent("", 0, None, finish_reason=finish_reason)


# ---- regex-constrained decoding -------------------------------------------------------------
class RegexConstraint:
    """The generated text must match `pattern` (Python `regex` syntax, matched in full).

    At each step a token is allowed if the text so far plus the token's text can still be
    extended to a full match (`regex`'s partial matching); eos is allowed once the text is a
    full match, and when nothing can follow the sequence ends by itself. Tokens are first pruned
    by their first character, so a step costs one partial match per distinct first character
    plus one per surviving candidate.

    Built for byte-level BPE tokenizers (lmforge's, GPT-2/Llama-3 style): a token's text is its
    standalone decoding. Tokens that are not valid UTF-8 on their own (pieces of a multi-byte
    character) and special tokens are never allowed, so the output is limited to characters
    that some single token spells out completely."""

    def __init__(
        self, pattern: str, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Iterable[int] = ()
    ) -> None:
        try:
            self.pattern = regex.compile(pattern)
        except regex.error as err:
            raise UserError(f"invalid --regex pattern {pattern!r}: {err}") from err
        self.vocab_size = vocab_size
        self.eos = [t for t in eos_token_ids if 0 <= t < vocab_size]
        special = {tok.content for tok in tokenizer.get_added_tokens_decoder().values() if tok.special}
        self.texts: list[str] = []
        self.by_first_char: dict[str, list[int]] = {}
        for token_id in range(vocab_size):
            piece = tokenizer.id_to_token(token_id)
            text = (
                ""
                if piece is None or piece in special
                else tokenizer.decode([token_id], skip_special_tokens=False)
            )
            if REPLACEMENT_CHAR in text:
                text = ""
            self.texts.append(text)
            if text:
                self.by_first_char.setdefault(text[0], []).append(token_id)

    def allowed_tokens(self, generated: Sequence[int]) -> torch.Tensor:
        text = "".join(self.texts[t] for t in generated if t not in self.eos)
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        allowed = [
            token_id
            for first, ids in self.by_first_char.items()
            if self.pattern.fullmatch(text + first, partial=True)
            for token_id in ids
            if self.pattern.fullmatch(text + self.texts[token_id], partial=True)
        ]
        if self.eos and self.pattern.fullmatch(text):
            allowed.extend(self.eos)
        if allowed:
            mask[torch.tensor(allowed)] = True
        return mask


# ---- text-level generation ------------------------------------------------------------------
@dataclass
class TextResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop token or stop string), "length", "cancelled"
    prompt_tokens: int
    time_to_first_token_s: float | None = None
    elapsed_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second after the first one (the prefill is in time_to_first_token_s)."""
        if self.time_to_first_token_s is None or len(self.token_ids) < 2:
            return None
        decode_time = self.elapsed_s - self.time_to_first_token_s
        return (len(self.token_ids) - 1) / decode_time if decode_time > 0 else None


def stream_text(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    params: SamplingParams | None = None,
    stop: Iterable[str] = (),
    constraint=None,
) -> Iterator[str]:
    """Yield text deltas for one prompt as they are generated (n must be 1)."""
    params = params or SamplingParams()
    if params.n != 1:
        raise UserError("streaming text supports one sample (n=1); use generate_text for n > 1")
    prompt_ids, params, decoder = _prepare(model, tokenizer, prompt, params, stop)
    yield from decode_events(stream(model, prompt_ids, params, constraint), decoder)


def generate_text(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    params: SamplingParams | None = None,
    stop: Iterable[str] = (),
    constraint=None,
    on_text: Callable[[str], None] | None = None,
) -> TextResult:
    """Continue a text prompt (one sample); `on_text` receives the deltas as they come."""
    params = params or SamplingParams()
    if params.n != 1:
        raise UserError("generate_text returns one sample (n=1)")
    prompt_ids, params, decoder = _prepare(model, tokenizer, prompt, params, stop)
    start = time.perf_counter()
    return _result(stream(model, prompt_ids, params, constraint), decoder, len(prompt_ids), start, on_text)


def _result(
    events: Iterable[TokenEvent],
    decoder: TextDecoder,
    prompt_tokens: int,
    start: float,
    on_text: Callable[[str], None] | None = None,
) -> TextResult:
    """Run the events through `decode_events`, passing each delta to `on_text`, and sum up."""
    for delta in decode_events(events, decoder):
        if on_text is not None:
            on_text(delta)
    first = decoder.first_token_at - start if decoder.first_token_at is not None else None
    reason = str(decoder.finish_reason)  # always set: decode_events finishes the decoder
    return TextResult(
        decoder.text, decoder.token_ids, reason, prompt_tokens, first, time.perf_counter() - start
    )


def _prepare(
    model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams, stop: Iterable[str]
):
    """Prompt ids, params that stop at the tokenizer's eos, and a text decoder for the output."""
    prompt_ids = encode_prompt(tokenizer, prompt, model.config.bos_token_id)
    return prompt_ids, _with_eos(params, tokenizer, model), TextDecoder(tokenizer, prompt_ids, stop)


def _with_eos(params: SamplingParams, tokenizer: Tokenizer, model: torch.nn.Module) -> SamplingParams:
    """Stop at the tokenizer's end-of-text token when the model config names no eos."""
    if model.config.eos_token_id is not None or params.ignore_eos:
        return params
    extra = tuple(t for t in eos_token_ids(tokenizer, None) if t not in params.stop_token_ids)
    if not extra:
        return params
    from dataclasses import replace

    return replace(params, stop_token_ids=params.stop_token_ids + extra)


# ---- the `lmforge generate` stage -----------------------------------------------------------
def generate_from_dir(
    model_dir: str | Path,
    prompt: str,
    params: SamplingParams,
    *,
    stop: Sequence[str] = (),
    num_beams: int = 1,
    length_penalty: float = 1.0,
    regex_pattern: str | None = None,
    draft_model_dir: str | Path | None = None,
    num_draft_tokens: int = 4,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    compile: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> TextResult:
    """Load a model directory and continue `prompt`: beam search if num_beams > 1, speculative
    decoding if a draft model is given, otherwise sampling (greedy at temperature 0) on the
    engine (`compile=True`: its decode step goes through torch.compile / CUDA graphs)."""
    from lmforge.model.checkpoint import load_model_dir
    from lmforge.model.quantized import share_tied_embedding

    if num_beams > 1 and (regex_pattern or draft_model_dir):
        raise UserError("--num-beams cannot be combined with --regex or --draft-model")
    if draft_model_dir and regex_pattern:
        raise UserError("--draft-model cannot be combined with --regex")
    if compile and (num_beams > 1 or draft_model_dir):
        raise UserError("--compile applies to sampling/greedy decoding, not to --num-beams or --draft-model")
    model = apply_decode_layout(share_tied_embedding(load_model_dir(model_dir, device=device, dtype=dtype)))
    tokenizer = model_tokenizer(model_dir, model.config.vocab_size)
    prompt_ids, params, decoder = _prepare(model, tokenizer, prompt, params, stop)
    start = time.perf_counter()
    if num_beams > 1:  # beam search knows its best text only at the end: it is shown all at once
        beam = BeamSearchParams(
            num_beams=num_beams,
            max_new_tokens=params.max_new_tokens,
            length_penalty=length_penalty,
            stop_token_ids=params.stop_token_ids,
            ignore_eos=params.ignore_eos,
        )
        best = beam_search(model, prompt_ids, beam)[0]
        events = token_events(best.token_ids, "stop" if best.finished else "length")
    elif draft_model_dir:
        from lmforge.model.speculative import speculative_generate

        draft = apply_decode_layout(load_model_dir(draft_model_dir, device=device, dtype=dtype))
        out = speculative_generate(model, draft, prompt_ids, params, num_draft_tokens)
        events = token_events(out.token_ids, out.finish_reason)
    else:
        constraint = None
        if regex_pattern:
            constraint = RegexConstraint(
                regex_pattern,
                tokenizer,
                model.config.vocab_size,
                eos_token_ids(tokenizer, model.config.eos_token_id),
            )
        events = stream(model, prompt_ids, params, constraint, compile=compile)
    return _result(events, decoder, len(prompt_ids), start, on_text)
