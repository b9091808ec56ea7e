"""Wire formats between the router and the model replicas, and the error both of them raise.

`APIError` is answered as OpenAI's error object (serving/http_models.py `ErrorResponse`) with its
HTTP status; a replica sends it to the router as an "error" event. The HTTP bodies themselves are
in serving/http_models.py.

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
from typing import Any


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
    adapter: str | None = None  # the LoRA adapter to generate with (model "BASE:NAME"); None = the base

    @property
    def chat(self) -> bool:
        return self.messages is not None
