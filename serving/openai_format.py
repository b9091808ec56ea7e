"""OpenAI response objects from replica events: one routine for completions and chat.

A request is one replica stream per prompt; serving/api.py opens them and merges their events,
each tagged with its prompt index p (protocol.py lists the events). Choice k = p * n + i gathers
the text, token log-probabilities and finish reason of its events: `collect` returns the whole
response, `stream` yields a chunk per event as it arrives. The same loop serves both endpoints;
what differs - object types, where the text goes (`text` or `message`/`delta`), the
log-probability format, what opens a stream (the echoed prompt, the assistant role) - is a
`Format`: `CompletionFormat` or `ChatFormat`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from lmforge.serving.http_models import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionResponse,
    ChoiceDelta,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

Events = AsyncIterator[tuple[int, dict[str, Any]]]  # (prompt index, event), from APIService.merged


@dataclass
class Reply:
    """What every object of one answer shares."""

    id: str
    model: str  # the served model id
    n: int  # choices per prompt
    starts: list[dict[str, Any]]  # each prompt's "start" event (prompt tokens, echoed prompt)
    created: int = field(default_factory=lambda: int(time.time()))

    def choice_index(self, prompt: int, index: int) -> int:
        return prompt * self.n + index


@dataclass
class Piece:
    """A choice's text so far (collect), or what one event adds to it (stream)."""

    text: str = ""
    entries: list[dict[str, Any] | None] = field(default_factory=list)  # per token, see runner.TokenTexts
    finish_reason: str | None = None


class Format(Protocol):
    opens_stream: bool  # whether a stream starts with a chunk per choice, before any token

    def start(self, first: dict[str, Any]) -> Piece: ...  # what a choice holds before its first token
    def choice(self, index: int, piece: Piece) -> BaseModel: ...
    def chunk_choice(self, index: int, piece: Piece, opening: bool = False) -> BaseModel: ...
    def response(self, reply: Reply, choices: list, usage: Usage) -> BaseModel: ...
    def chunk(self, reply: Reply, choices: list, usage: Usage | None = None) -> BaseModel: ...


# ---- the shared routine ---------------------------------------------------------------------------
async def collect(fmt: Format, reply: Reply, events: Events) -> BaseModel:
    """The whole response, once every choice has finished."""
    pieces = {
        reply.choice_index(p, i): fmt.start(first)
        for p, first in enumerate(reply.starts)
        for i in range(reply.n)
    }
    usage = _UsageCounter(reply.starts)
    async for p, event in events:
        usage.add(event)
        if event["type"] == "delta":
            piece = pieces[reply.choice_index(p, event["index"])]
            piece.text += event["text"]
            piece.entries.extend(event.get("logprobs") or [])
        elif event["type"] == "finish":
            pieces[reply.choice_index(p, event["index"])].finish_reason = event["reason"]
    choices = [fmt.choice(k, piece) for k, piece in sorted(pieces.items())]
    return fmt.response(reply, choices, usage.body())


async def stream(fmt: Format, reply: Reply, events: Events, include_usage: bool) -> AsyncIterator[BaseModel]:
    """One chunk per event that changes a choice, then (include_usage) a chunk with only `usage`."""
    usage = _UsageCounter(reply.starts)
    if fmt.opens_stream:
        for p, first in enumerate(reply.starts):
            for i in range(reply.n):
                opening = fmt.chunk_choice(reply.choice_index(p, i), fmt.start(first), opening=True)
                yield fmt.chunk(reply, [opening])
    async for p, event in events:
        usage.add(event)
        if event["type"] == "delta" and (event["text"] or event.get("logprobs")):
            piece = Piece(event["text"], list(event.get("logprobs") or []))
        elif event["type"] == "finish":
            piece = Piece(finish_reason=event["reason"])
        else:
            continue
        yield fmt.chunk(reply, [fmt.chunk_choice(reply.choice_index(p, event["index"]), piece)])
    if include_usage:
        yield fmt.chunk(reply, [], usage.body())


class _UsageCounter:
    def __init__(self, starts: list[dict[str, Any]]) -> None:
        self.prompt = sum(first["prompt_tokens"] for first in starts)
        self.completion = 0

    def add(self, event: dict[str, Any]) -> None:
        if event["type"] == "finish":
            self.completion += event["completion_tokens"]

    def body(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt,
            completion_tokens=self.completion,
            total_tokens=self.prompt + self.completion,
        )


# ---- /v1/completions ------------------------------------------------------------------------------
class CompletionFormat:
    """Text choices; with `echo` every choice (and a stream) starts with the prompt."""

    def __init__(self, echo: bool, logprobs: bool) -> None:
        self.echo, self.logprobs = echo, logprobs
        self.opens_stream = echo

    def start(self, first: dict[str, Any]) -> Piece:
        if not self.echo:
            return Piece()
        return Piece(first.get("prompt_text", ""), list(first.get("prompt_logprobs") or []))

    def choice(self, index: int, piece: Piece) -> CompletionChoice:
        return CompletionChoice(
            index=index,
            text=piece.text,
            finish_reason=piece.finish_reason,
            logprobs=_completion_logprobs(piece.entries) if self.logprobs else None,
        )

    def chunk_choice(self, index: int, piece: Piece, opening: bool = False) -> CompletionChoice:
        return self.choice(index, piece)

    def response(self, reply: Reply, choices: list, usage: Usage) -> CompletionResponse:
        return CompletionResponse(
            id=reply.id, created=reply.created, model=reply.model, choices=choices, usage=usage
        )

    def chunk(self, reply: Reply, choices: list, usage: Usage | None = None) -> CompletionChunk:
        return CompletionChunk(
            id=reply.id, created=reply.created, model=reply.model, choices=choices, usage=usage
        )


def _completion_logprobs(entries: list[dict[str, Any] | None]) -> CompletionLogprobs:
    """OpenAI's legacy format: parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
    for e in entries:
        tokens.append(e["token"])
        token_logprobs.append(e["logprob"])
        top.append({t: lp for t, lp, _ in e["top"]} if e["logprob"] is not None else None)
        offsets.append(offset)
        offset += len(e["token"])
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets
    )


# ---- /v1/chat/completions -------------------------------------------------------------------------
class ChatFormat:
    """One assistant message per choice; a stream first announces the role of every choice."""

    opens_stream = True

    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs

    def start(self, first: dict[str, Any]) -> Piece:
        return Piece()

    def choice(self, index: int, piece: Piece) -> ChatChoice:
        return ChatChoice(
            index=index,
            message=ChatCompletionMessage(content=piece.text),
            finish_reason=piece.finish_reason,
            logprobs=self._logprobs(piece),
        )

    def chunk_choice(self, index: int, piece: Piece, opening: bool = False) -> ChatChunkChoice:
        if opening:
            delta = ChoiceDelta(role="assistant", content=piece.text)
        elif piece.finish_reason is None:
            delta = ChoiceDelta(content=piece.text)
        else:
            delta = ChoiceDelta()
        return ChatChunkChoice(
            index=index, delta=delta, finish_reason=piece.finish_reason, logprobs=self._logprobs(piece)
        )

    def response(self, reply: Reply, choices: list, usage: Usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=reply.id, created=reply.created, model=reply.model, choices=choices, usage=usage
        )

    def chunk(self, reply: Reply, choices: list, usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=reply.id, created=reply.created, model=reply.model, choices=choices, usage=usage
        )

    def _logprobs(self, piece: Piece) -> ChoiceLogprobs | None:
        if not self.logprobs:
            return None
        return ChoiceLogprobs(
            content=[
                TokenLogprob(
                    token=e["token"],
                    logprob=e["logprob"],
                    bytes=e["bytes"],
                    top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=b) for t, lp, b in e["top"]],
                )
                for e in piece.entries
            ]
        )
