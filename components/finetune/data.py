"""Fine-tuning data: JSONL examples -> token rows with the loss on response tokens only.

Formats (`data.format`):
    instruction   {"prompt": ..., "response": ...}: prompt tokens are context, the response and
                  the eos token after it are scored
    chat          {"messages": [{"role": ..., "content": ...}, ...]}: rendered with the tokenizer's
                  chat template; the content of every assistant turn (and the template's end-of-turn
                  tokens after it) is scored, everything else (system/user turns, role headers) is not
    text          {"text": ...}: continued pretraining, every token scored

Masking by construction: an example is encoded piece by piece (prompt, response; or the template's
text before each assistant turn, the turn's header, the turn) and each piece carries its own
"scored" flag, so no token of a prompt can become a target, whatever the tokenizer merges. Inputs
and targets are shifted by one: targets[t] = ids[t + 1] where ids[t + 1] is scored, else -100
(IGNORE_INDEX). An example has len(ids) - 1 positions; one longer than `max_seq_len` is truncated
(its start kept) or dropped (`overlong`), and an example left with no scored target is dropped;
both are counted (`DataStats`).

Rows (`max_seq_len` positions each):
    padding   one example per row, right-padded (pads: input pad id, target -100); a batch is cut
              to its longest row, so short examples cost little
    packing   examples placed one after another (first fit, in file order) in as few rows as
              possible; a row carries per-position `positions` (restarting at 0 for each example)
              and `segments` (1, 2, ... per example; 0 for the padding) from which the loss finds
              the examples: attention runs per example (model/varlen.py), so no token attends
              across examples and each example sees the positions it would see alone.
Either way the loss runs on the real tokens only (task.py `varlen_loss`): the padding costs no
compute, and the two layouts differ only in which examples share a micro-batch.

`SFTDataset` serves the rows as the loop's BatchSource: batches of (inputs, targets, positions,
segments), each (B, T). The rows follow a per-epoch seeded permutation cut into micro-batches; rank r
of W takes micro-batches r, W + r, 2W + r, ..., so every micro-batch (and so every step) holds the
same rows whatever the worker count; the state is one counter (exact resume). The loss is the mean
over a micro-batch's scored tokens, and micro-batches weigh equally in a step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmforge.errors import InputNotFoundError, UserError
from lmforge.tokenizer_files import load_tokenizer

IGNORE_INDEX = -100
Pieces = list[tuple[str, bool, bool]]  # (text, scored, add_special_tokens)


class DataError(UserError):
    """Training data is missing, malformed, or does not fit the configured format."""


# ---- the tokenizer and its chat template ------------------------------------------------------
@dataclass
class TextEncoder:
    """A model's tokenizer with what encoding examples needs: eos, pad, the chat template."""

    tokenizer: Tokenizer
    eos_id: int | None
    pad_id: int
    chat_template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token / eos_token, for templates
    chat_template_added: bool = False  # the template is lmforge's ChatML, added because none was there

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        assert self.chat_template is not None
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise DataError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )


def load_encoder(tokenizer_dir: str | os.PathLike, eos_id: int | None, need_chat: bool) -> TextEncoder:
    """The tokenizer of `tokenizer_dir` (a model or tokenizer directory). For chat data, the chat
    template comes from tokenizer_config.json (or chat_template.jinja); an lmforge tokenizer written
    before templates were added (it has <|im_start|> / <|im_end|> but no template) gets lmforge's
    ChatML template, which the stage writes into the output's tokenizer_config.json."""
    d = Path(tokenizer_dir)
    tokenizer = load_tokenizer(d)
    config: dict[str, Any] = {}
    if (d / "tokenizer_config.json").is_file():
        try:
            config = json.loads((d / "tokenizer_config.json").read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{d / 'tokenizer_config.json'} is not valid JSON: {err}") from None
    template = config.get("chat_template")
    if template is None and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()
    if isinstance(template, list):  # [{name, template}, ...]: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    added = False
    if template is None and need_chat:
        from lmforge.components.tokenizer import SpecialTokens

        chatml = SpecialTokens()
        if tokenizer.token_to_id(chatml.im_start) is None or tokenizer.token_to_id(chatml.im_end) is None:
            raise DataError(
                f"data.format=chat needs a chat template, and the tokenizer in {d} has none "
                f"(no chat_template in tokenizer_config.json, and no {chatml.im_start}/{chatml.im_end} "
                "tokens for lmforge's ChatML template); use data.format=instruction or a tokenizer with one"
            )
        template, added = chatml.chat_template(), True
    specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
    pad_id = next(
        (
            i
            for i in (tokenizer.token_to_id(_token_text(config.get("pad_token")) or ""), eos_id)
            if i is not None
        ),
        0,
    )
    return TextEncoder(tokenizer, eos_id, pad_id, template, {k: v for k, v in specials.items() if v}, added)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|eos|>", ...}
        return value.get("content")
    return value if isinstance(value, str) else None


def save_chat_template(tokenizer_dir: str | os.PathLike, template: str) -> None:
    """Write `template` into tokenizer_dir/tokenizer_config.json (`chat_template`)."""
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ---- examples -----------------------------------------------------------------------------
@dataclass
class DataStats:
    """What became of the examples of one file."""

    examples: int = 0  # lines read
    kept: int = 0  # examples in the rows
    truncated: int = 0  # kept, cut to max_seq_len (overlong: truncate)
    dropped_overlong: int = 0  # overlong: drop
    dropped_no_target: int = 0  # nothing left to score (empty response, or all of it cut off)
    rows: int = 0
    tokens: int = 0  # input positions holding an example's token (padding excluded)
    scored_tokens: int = 0  # targets that count in the loss

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class DataFormat:
    """How to read one JSONL record (the `data.*` fields that concern it)."""

    format: str = "instruction"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"


def read_jsonl(path: str | os.PathLike, what: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{what}: {p} does not exist")
    records = []
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{what}: {p}:{n} is not valid JSON: {err}") from None
            if not isinstance(record, dict):
                raise DataError(f"{what}: {p}:{n} must be a JSON object, got {type(record).__name__}")
            records.append(record)
    if not records:
        raise DataError(f"{what}: {p} holds no examples")
    return records


def _string_field(record: dict[str, Any], name: str, where: str, fmt: str) -> str:
    if name not in record:
        raise DataError(
            f"{where}: field {name!r} is missing (data.format={fmt}; fields: {', '.join(record)})"
        )
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def example_pieces(record: dict[str, Any], fmt: DataFormat, enc: TextEncoder, where: str) -> Pieces:
    """The example's text as pieces (text, scored, add_special_tokens), in order."""
    if fmt.format == "instruction":
        prompt = _string_field(record, fmt.prompt_field, where, fmt.format)
        response = _string_field(record, fmt.response_field, where, fmt.format)
        if not prompt:
            raise DataError(f"{where}: field {fmt.prompt_field!r} is empty")
        return [(prompt, False, True), (response, True, False)]
    if fmt.format == "text":
        return [(_string_field(record, fmt.text_field, where, fmt.format), True, True)]
    messages = record.get(fmt.messages_field)
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: field {fmt.messages_field!r} must be a non-empty list of "
            "{role, content} objects (data.format=chat)"
        )
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(f"{where}: {fmt.messages_field}[{i}] needs string fields 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn from")
    # Render growing prefixes: each message adds exactly the text after the previous prefix.
    pieces: Pieces = []
    previous = ""
    for i, message in enumerate(messages):
        full = enc.render(messages[: i + 1])
        if message["role"] == "assistant":
            head = enc.render(messages[:i], add_generation_prompt=True)
            _check_prefix(previous, head, where)
            _check_prefix(head, full, where)
            pieces += [(head[len(previous) :], False, False), (full[len(head) :], True, False)]
        else:
            _check_prefix(previous, full, where)
            pieces.append((full[len(previous) :], False, False))
        previous = full
    return [p for p in pieces if p[0]]


def _check_prefix(prefix: str, text: str, where: str) -> None:
    if not text.startswith(prefix):
        raise DataError(
            f"{where}: the chat template does not render conversations incrementally (the text for "
            "the first n messages is not a prefix of the text for n + 1), so response tokens cannot "
            "be told from prompt tokens"
        )


def encode_example(pieces: Pieces, enc: TextEncoder, add_eos: bool) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one example: targets[t] = ids[t + 1] when that token is scored."""
    ids: list[int] = []
    scored: list[bool] = []
    for text, score, special in pieces:
        piece = enc.encode(text, add_special_tokens=special)
        ids += piece
        scored += [score] * len(piece)
    if add_eos and enc.eos_id is not None and scored and scored[-1]:
        ids.append(enc.eos_id)
        scored.append(True)
    targets = [ids[t + 1] if scored[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    return ids[:-1], targets


def load_examples(
    path: str | os.PathLike,
    fmt: DataFormat,
    enc: TextEncoder,
    max_seq_len: int,
    overlong: str,
    what: str = "data.train",
) -> tuple[list[tuple[list[int], list[int]]], DataStats]:
    """Every usable example of a JSONL file as (inputs, targets), and what became of the rest."""
    stats = DataStats()
    examples = []
    for n, record in enumerate(read_jsonl(path, what), 1):
        stats.examples += 1
        pieces = example_pieces(record, fmt, enc, f"{what}: {path}:{n}")
        inputs, targets = encode_example(pieces, enc, add_eos=fmt.format != "chat")
        if len(inputs) > max_seq_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            inputs, targets = inputs[:max_seq_len], targets[:max_seq_len]
            stats.truncated += 1
        scored = sum(t != IGNORE_INDEX for t in targets)
        if scored == 0:
            stats.dropped_no_target += 1
            continue
        stats.kept += 1
        stats.tokens += len(inputs)
        stats.scored_tokens += scored
        examples.append((inputs, targets))
    return examples, stats


# ---- rows ---------------------------------------------------------------------------------
@dataclass
class Rows:
    """(N, T) tensors: inputs (pad id where empty), targets (-100 where not scored), positions, segments."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


def make_rows(
    examples: list[tuple[list[int], list[int]]], max_seq_len: int, packing: bool, pad_id: int
) -> Rows:
    """Place the examples in rows of `max_seq_len` positions (see the module docstring)."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = 0
    for example in examples:
        n = len(example[0])
        if packing and rows and used + n <= max_seq_len:
            rows[-1].append(example)
            used += n
        else:
            rows.append([example])
            used = n
    shape = (len(rows), max_seq_len)
    inputs = torch.full(shape, pad_id, dtype=torch.int64)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
    positions = torch.zeros(shape, dtype=torch.int64)
    segments = torch.zeros(shape, dtype=torch.int64)
    for r, row in enumerate(rows):
        start = 0
        for s, (ids, tgt) in enumerate(row, 1):
            end = start + len(ids)
            inputs[r, start:end] = torch.tensor(ids)
            targets[r, start:end] = torch.tensor(tgt)
            positions[r, start:end] = torch.arange(len(ids))
            segments[r, start:end] = s
            start = end
    return Rows(inputs, targets, positions, segments)


class SFTDataset:
    """A rank's stream of fine-tuning rows (the loop's BatchSource): endless, seeded, resumable."""

    def __init__(
        self, rows: Rows, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        if len(rows) < world_size:
            raise DataError(f"{len(rows)} row(s) of data cannot give each of {world_size} workers one")
        self.rows, self.seed, self.rank, self.world_size, self.shuffle = rows, seed, rank, world_size, shuffle
        self.consumed = 0  # rows this rank has read
        self._epoch, self._order = -1, torch.arange(len(rows))

    def _row(self, global_index: int) -> int:
        n = len(self.rows)
        epoch = global_index // n
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._order = torch.randperm(n, generator=g)
            self._epoch = epoch
        return int(self._order[global_index % n])

    def _batch(self, index: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.tensor(index)
        parts = [
            self.rows.inputs[idx],
            self.rows.targets[idx],
            self.rows.positions[idx],
            self.rows.segments[idx],
        ]
        used = int((parts[3] > 0).any(0).nonzero().max()) + 1  # cut the columns that are padding in every row
        return tuple(p[:, :used].contiguous() for p in parts)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        # Micro-batch c of this rank is global chunk c * W + rank (chunks of `batch_size` consecutive
        # rows of the global order): one process running all W * accum micro-batches of a step sees
        # exactly the same micro-batches, so the per-micro-batch mean losses, and the step, are the
        # same for any worker count.
        chunk = (self.consumed // batch_size) * self.world_size + self.rank
        index = [self._row(chunk * batch_size + k) for k in range(batch_size)]
        self.consumed += batch_size
        return self._batch(index)

    def iter_eval_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        mine = list(range(self.rank, len(self.rows), self.world_size))  # in file order, no wrap
        for b, start in enumerate(range(0, len(mine), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self._batch(mine[start : start + batch_size])

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rows") not in (None, len(self.rows)):
            raise DataError(
                f"the checkpoint was written with {state['rows']} rows of training data, this run has "
                f"{len(self.rows)}: the data or max_seq_len/packing changed, so the run cannot resume exactly"
            )
        self.consumed = int(state["consumed"])
