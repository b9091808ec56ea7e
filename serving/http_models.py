"""Every body the HTTP API reads or writes, as pydantic models: FastAPI validates requests with them
and writes the OpenAPI document from them, so the document is the code.

OpenAI's objects keep OpenAI's field names and types (what the official SDKs parse); lmforge's
extensions to a request use vLLM's names (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`).

Requests are validated strictly (no "5" for 5, no unknown fields), so a client bug is a 400 that
names the field instead of a silently different request. Fields that OpenAI defines but lmforge
cannot honour (logit_bias, suffix, tools, ...) are refused rather than ignored: unknown ones by
the schema, the ones declared here by `check_unsupported()` (with code `unsupported_parameter`).

Responses are plain models; serving/openai_format.py builds the OpenAI ones from the replicas'
events. Stream chunks leave out `usage` except in the final usage chunk, and a chat delta leaves
out its empty fields, as OpenAI does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmforge.model.generation import MAX_LOGPROBS
from lmforge.serving.protocol import bad_request

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_N = 128

FinishReason = Literal["stop", "length", "cancelled"]


def _absent_if_none(value: Any) -> bool:
    return value is None


# ---- errors -------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, ...")
    param: str | None = Field(description="The request field at fault, when there is one")
    code: str | None = Field(description="e.g. invalid_json, model_not_found, context_length_exceeded")


class ErrorResponse(BaseModel):
    """OpenAI's error object: every refusal, whatever its status."""

    error: ErrorDetail


# ---- requests -----------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names and ranges)."""

    model: str = Field(description="The served model id (see GET /v1/models)")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N, description="Choices to generate for each prompt")
    stream: bool = Field(False, description="Answer with server-sent events (text/event-stream)")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} non-empty stop strings (not returned)"
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, description="Makes sampling reproducible (choice i uses seed + i)")
    user: str | None = Field(
        None, description="End-user id; also keeps an A/B test's choice of version sticky"
    )
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: must be absent or empty")
    # lmforge extensions (vLLM uses the same names)
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0 = off)")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token (benchmarks)")

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(
                f"stop: at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}", "stop"
            )
        if any(not s for s in stops):
            raise bad_request("stop: stop strings must be non-empty", "stop")
        return stops

    def check_unsupported(self) -> None:
        if self.logit_bias:
            raise bad_request(
                "logit_bias is not supported by this server", "logit_bias", "unsupported_parameter"
            )

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments for model.generation.SamplingParams (max_new_tokens and stops added later)."""
        return dict(
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=self.top_k,
            min_p=float(self.min_p),
            repetition_penalty=float(self.repetition_penalty),
            frequency_penalty=float(self.frequency_penalty),
            presence_penalty=float(self.presence_penalty),
            n=self.n,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a batch of texts, token ids, or a batch of token-id lists"
    )
    max_tokens: int | None = Field(
        None, ge=0, description="Tokens to generate per choice (default 16; 0 needs echo)"
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Log-probabilities of the chosen tokens plus this many alternatives",
    )
    echo: bool = Field(
        False,
        description="Return the prompt before the completion (with logprobs: its token "
        "log-probabilities, as lm-evaluation-harness uses)",
    )
    best_of: int | None = Field(None, ge=1, description="Only best_of == n is supported")
    suffix: str | None = Field(None, description="Not supported: must be absent")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt: the list of prompts is empty", "prompt")
        if isinstance(p[0], int):
            return [list(p)]
        return [x if isinstance(x, str) else list(x) for x in p]

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix is not None:
            raise bad_request("suffix is not supported by this server", "suffix", "unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(
                f"best_of={self.best_of} is not supported: only best_of == n ({self.n})",
                "best_of",
                "unsupported_parameter",
            )
        if self.max_tokens == 0 and not self.echo:
            raise bad_request(
                "max_tokens: must be >= 1 (0 is allowed only with echo=true, to score a prompt)", "max_tokens"
            )
        if self.max_tokens == 0 and self.stream:
            raise bad_request("max_tokens=0 cannot be streamed", "max_tokens")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise bad_request(
                "give max_tokens or max_completion_tokens, not two different values", "max_completion_tokens"
            )

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses: shared --------------------------------------------------------------------------
class Usage(BaseModel):
    """Tokens of every prompt and every choice of the request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _ObjectFields(BaseModel):
    id: str
    created: int = Field(description="Unix time in seconds")
    model: str


# ---- responses: /v1/completions -----------------------------------------------------------------
class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first token of an echoed prompt")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = Field(description="prompt index * n + choice index")
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None


class CompletionResponse(_ObjectFields):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_ObjectFields):
    """One server-sent event of a streamed completion; `usage` only in the final usage chunk."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_absent_if_none)


# ---- responses: /v1/chat/completions ------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="UTF-8 bytes of the token (a token may end mid-character)")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None


class ChatCompletionResponse(_ObjectFields):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChoiceDelta(BaseModel):
    """The first chunk of a choice carries the role, later ones the new text, the last one nothing."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_absent_if_none)
    content: str | None = Field(None, exclude_if=_absent_if_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None


class ChatCompletionChunk(_ObjectFields):
    """One server-sent event of a streamed chat completion; `usage` only in the final usage chunk."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_absent_if_none)


# ---- responses: /v1/models ----------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str = Field(description='What a request sends as "model": BASE, or BASE:ADAPTER for a LoRA adapter')
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(None, description="For a LoRA adapter: the id of the base model it runs on")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- lmforge's operations endpoints -------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    model: str = Field(description="The served model id")
    variants: dict[str, dict[str, Any]] = Field(
        description="Per variant (a, b): the replica's model info, or {'error': ...} when it does not answer"
    )


class ReloadRequest(_Strict):
    variant: Literal["a", "b"] | None = Field(None, description="Default: every variant")
    force: bool = Field(False, description="Reload even when the source has not changed")


class ReloadResult(BaseModel):
    variant: str
    before: str = Field(description="The version served before the reload")
    model: str = Field(description="The version served now")
    swapped: bool
    error: str | None = Field(description="Why the reload failed (the previous version keeps serving)")


class ReloadResponse(BaseModel):
    results: dict[str, ReloadResult]
