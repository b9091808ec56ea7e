"""Wire formats: the OpenAI request schemas, the OpenAI error object, and the router <-> replica messages.

Request bodies are validated strictly (no "5" for 5, no unknown fields), so a client bug is a
400 that names the field instead of a silently different request. Fields that OpenAI defines but
lmforge cannot honour (logit_bias, suffix, tools, ...) are refused rather than ignored.

Between the router and a model replica travels a `GenerationRequest` (one prompt) and, back, a
stream of plain dict events (picklable, so they cross Ray process boundaries unchanged):
    {"type": "start", "prompt_tokens": int, "model": str, "stats": {...}, ["prompt_logprobs": [...]]}
    {"type": "delta", "index": i, "text": str, "token_ids": [...], ["logprobs": [...]]}
    {"type": "finish", "index": i, "reason": "stop"|"length"|"cancelled", "completion_tokens": int}
    {"type": "end", "stats": {...}}
    {"type": "error", "status": int, "error_type": str, "message": str, "param": str|None, "code": str|None,
     "retry_after": int|None}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmforge.model.generation import MAX_LOGPROBS

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_N = 128


# ---- errors -----------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as an OpenAI error object: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def event(self) -> dict[str, Any]:
        """The same error as a replica stream event."""
        retry = self.headers.get("Retry-After")
        return {
            "type": "error",
            "status": self.status,
            "error_type": self.error_type,
            "message": self.message,
            "param": self.param,
            "code": self.code,
            "retry_after": int(retry) if retry else None,
        }

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> APIError:
        headers = {"Retry-After": str(event["retry_after"])} if event.get("retry_after") else {}
        return cls(
            event["status"],
            event["message"],
            event["error_type"],
            event.get("param"),
            event.get("code"),
            headers,
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ---- OpenAI request schemas ------------------------------------------------------------------
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
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} stop strings (not returned)"
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


# ---- router -> replica -----------------------------------------------------------------------
@dataclass
class GenerationRequest:
    """One prompt to continue (a batch of prompts is one GenerationRequest each)."""

    request_id: str
    prompt: str | list[int] | None = None  # /v1/completions: text or token ids
    messages: list[dict[str, str]] | None = None  # /v1/chat/completions: [{"role", "content"}]
    max_tokens: int | None = None  # None = the rest of the context
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams keyword arguments
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None = off; k = chosen token + k alternatives
    echo: bool = False  # also report the prompt (its token logprobs when logprobs is set)

    @property
    def chat(self) -> bool:
        return self.messages is not None
