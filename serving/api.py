"""The OpenAI-compatible HTTP API (FastAPI), independent of Ray.

`create_app(service)` builds the ASGI app; `APIService` holds what a router needs: the config, the
authenticator and rate limiter, the metrics, and one `Backend` per model variant. A backend is
either a Ray Serve handle to a model deployment (serving/app.py) or a `ModelServer` in this
process (`LocalBackend`, used by the fast tests), so the HTTP behaviour is tested without Ray.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{id}], GET /health
(liveness), GET /ready (every variant answers), GET /metrics (Prometheus text), POST /admin/reload
(admin key), GET /openapi.json and /docs.

Request order: body size -> API key -> rate limit -> JSON schema -> model id -> the replica's
own checks (context length, sampling ranges). Every refusal is an OpenAI error object
{"error": {"message", "type", "param", "code"}} with a 4xx status; 503/429 carry Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serving.auth import Authenticator, AuthError, Principal, RateLimiter
from lmforge.serving.config import ServeConfig
from lmforge.serving.metrics import CONTENT_TYPE, SequenceTimer, ServingMetrics
from lmforge.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    bad_request,
)

log = logging.getLogger("lmforge.serving")
access_log = logging.getLogger("lmforge.serving.access")

KNOWN_PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/ready",
    "/metrics",
    "/admin/reload",
    "/openapi.json",
    "/docs",
)
STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


# ---- backends -----------------------------------------------------------------------------------
class Backend(Protocol):
    """One model variant as the router sees it."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def info(self) -> dict[str, Any]: ...
    async def reload(self, force: bool = False) -> dict[str, Any]: ...


class LocalBackend:
    """A ModelServer in this process."""

    def __init__(self, server) -> None:
        self.server = server

    def generate(self, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        return self.server.generate(request)

    async def stats(self) -> dict[str, Any]:
        return self.server.stats()

    async def info(self) -> dict[str, Any]:
        return self.server.info()

    async def reload(self, force: bool = False) -> dict[str, Any]:
        return await asyncio.to_thread(self.server.reload, force)


# ---- the service ------------------------------------------------------------------------------
class APIService:
    def __init__(
        self,
        cfg: ServeConfig,
        backends: dict[str, Backend],
        *,
        auth: Authenticator | None = None,
        metrics: ServingMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.backends = backends
        self.auth = auth or Authenticator.from_config(cfg)
        self.limiter = RateLimiter(cfg.rate_limit_per_minute)
        self.metrics = metrics or ServingMetrics()
        self.model_id = cfg.model_id
        self.created = int(time.time())
        self._rng = rng or random.Random()

    # ---- routing ----
    def choose_variant(self, user: str | None) -> str:
        """A/B split: version B gets `ab_test.weight` of the requests; the same `user` always gets
        the same version (a stable hash), so one conversation never flips between versions."""
        if "b" not in self.backends or self.cfg.ab_test is None:
            return "a"
        draw = (zlib.crc32(user.encode("utf-8")) % 10_000) / 10_000 if user else self._rng.random()
        return "b" if draw < self.cfg.ab_test.weight else "a"

    def authorize(self, request: Request, *, admin: bool = False) -> Principal:
        try:
            principal = self.auth.check(request.headers.get("authorization"), admin=admin)
        except AuthError as err:
            error_type = "authentication_error" if err.status == 401 else "permission_error"
            raise APIError(
                err.status,
                err.message,
                error_type,
                code="invalid_api_key" if err.status == 401 else None,
                headers={"WWW-Authenticate": "Bearer"} if err.status == 401 else None,
            ) from None
        request.state.key_id = principal.key_id
        wait = self.limiter.acquire(principal.key_id)
        if wait:
            raise APIError(
                429,
                f"rate limit of {self.cfg.rate_limit_per_minute} requests per minute reached for "
                "this API key; retry later",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(int(wait))},
            )
        return principal

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(
                404,
                f"model {model!r} is not served here; available: {self.model_id!r} (GET /v1/models)",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    # ---- opening replica streams ----
    async def _open(self, backend: Backend, request: GenerationRequest):
        """Start one generation and wait for its first event, so errors become an HTTP status."""
        agen = backend.generate(request).__aiter__()
        try:
            first = await agen.__anext__()
        except StopAsyncIteration:
            raise APIError(
                500, "the model replica ended the request without answering", "server_error"
            ) from None
        except BaseException as err:
            await _aclose(agen)
            raise _backend_error(err) from err
        if first["type"] == "error":
            await _aclose(agen)
            raise APIError.from_event(first)
        return agen, first

    async def open_all(self, variant: str, requests: list[GenerationRequest]):
        backend = self.backends[variant]
        results = await asyncio.gather(*(self._open(backend, r) for r in requests), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for r in results:
                if not isinstance(r, BaseException):
                    await _aclose(r[0])
            err = errors[0]
            raise err if isinstance(err, APIError) else _backend_error(err)
        return results

    async def merged(self, opened, variant: str, start: float) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """(prompt index, event) from every prompt's stream as they come; closing this generator
        (client disconnect) closes every stream, which cancels the generation in the replicas."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(p: int, agen) -> None:
            try:
                async for event in agen:
                    await queue.put((p, event))
            except BaseException as err:  # noqa: BLE001 - delivered to the consumer, which re-raises
                await queue.put((p, err))
            finally:
                await _aclose(agen)
                await queue.put((p, done))

        tasks = [asyncio.ensure_future(pump(p, agen)) for p, (agen, _) in enumerate(opened)]
        timers: dict[tuple[int, int], SequenceTimer] = {}
        models = {p: first["model"] for p, (_, first) in enumerate(opened)}
        for p, (_, first) in enumerate(opened):
            self._observe(variant, models[p], first, p, timers, start)
        remaining = len(tasks)
        try:
            while remaining:
                p, item = await queue.get()
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise _backend_error(item)
                if item["type"] == "error":
                    raise APIError.from_event(item)
                self._observe(variant, models[p], item, p, timers, start)
                yield p, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _observe(self, variant: str, model: str, event: dict, p: int, timers: dict, start: float) -> None:
        m, kind = self.metrics, event["type"]
        if "stats" in event:
            m.engine.update(variant, event["stats"])
        if kind == "start":
            m.prompt_tokens.labels(model).inc(event["prompt_tokens"])
        elif kind == "delta" and event["token_ids"]:
            key = (p, event["index"])
            timer = timers.setdefault(key, SequenceTimer(m, model, start))
            timer.tokens(len(event["token_ids"]))
            m.generated_tokens.labels(model).inc(len(event["token_ids"]))
        elif kind == "finish":
            m.sequences_finished.labels(model, event["reason"]).inc()

    # ---- /v1/completions ----
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        start = time.perf_counter()
        self.check_model(body.model)
        body.check_unsupported()
        stops = body.stop_list()
        max_tokens = body.max_tokens if body.max_tokens is not None else self.cfg.default_max_tokens
        logprobs = body.logprobs
        requests = [
            GenerationRequest(
                f"cmpl-{uuid.uuid4().hex}",
                prompt=p,
                max_tokens=max_tokens,
                sampling=body.sampling(),
                stop=stops,
                logprobs=logprobs,
                echo=body.echo,
            )
            for p in body.prompts()
        ]
        variant = self.choose_variant(body.user)
        opened = await self.open_all(variant, requests)
        rid, created, n = requests[0].request_id, int(time.time()), body.n
        headers = _model_headers(variant, opened)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(
                self._stream_completions(
                    opened, variant, start, rid, created, n, body.echo, logprobs, include_usage
                ),
                headers,
            )
        choices = {
            p * n + i: {"text": "", "entries": [], "finish_reason": None}
            for p in range(len(opened))
            for i in range(n)
        }
        usage = _Usage(opened)
        if body.echo:
            for p, (_, first) in enumerate(opened):
                for i in range(n):
                    choices[p * n + i]["text"] = first.get("prompt_text", "")
                    choices[p * n + i]["entries"] = list(first.get("prompt_logprobs") or [])
        async for p, ev in self.merged(opened, variant, start):
            usage.add(ev)
            if ev["type"] == "delta":
                c = choices[p * n + ev["index"]]
                c["text"] += ev["text"]
                c["entries"].extend(ev.get("logprobs") or [])
            elif ev["type"] == "finish":
                choices[p * n + ev["index"]]["finish_reason"] = ev["reason"]
        out = [
            {
                "index": k,
                "text": c["text"],
                "finish_reason": c["finish_reason"],
                "logprobs": _completion_logprobs(c["entries"]) if logprobs is not None else None,
            }
            for k, c in sorted(choices.items())
        ]
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.model_id,
                "choices": out,
                "usage": usage.body(),
            },
            headers=headers,
        )

    async def _stream_completions(
        self, opened, variant, start, rid, created, n, echo, logprobs, include_usage
    ):
        usage = _Usage(opened)

        def chunk(index: int, text: str, entries, finish_reason) -> dict:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.model_id,
                "choices": [
                    {
                        "index": index,
                        "text": text,
                        "finish_reason": finish_reason,
                        "logprobs": _completion_logprobs(entries) if logprobs is not None else None,
                    }
                ],
            }

        if echo:
            for p, (_, first) in enumerate(opened):
                for i in range(n):
                    yield chunk(
                        p * n + i, first.get("prompt_text", ""), first.get("prompt_logprobs") or [], None
                    )
        async for p, ev in self.merged(opened, variant, start):
            usage.add(ev)
            if ev["type"] == "delta" and (ev["text"] or ev.get("logprobs")):
                yield chunk(p * n + ev["index"], ev["text"], ev.get("logprobs") or [], None)
            elif ev["type"] == "finish":
                yield chunk(p * n + ev["index"], "", [], ev["reason"])
        if include_usage:
            yield {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.model_id,
                "choices": [],
                "usage": usage.body(),
            }

    # ---- /v1/chat/completions ----
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        start = time.perf_counter()
        self.check_model(body.model)
        body.check_unsupported()
        messages = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in body.messages
        ]
        greq = GenerationRequest(
            f"chatcmpl-{uuid.uuid4().hex}",
            messages=messages,
            max_tokens=body.token_limit(),
            sampling=body.sampling(),
            stop=body.stop_list(),
            logprobs=body.engine_logprobs(),
        )
        variant = self.choose_variant(body.user)
        opened = await self.open_all(variant, [greq])
        created, n, want_logprobs = int(time.time()), body.n, body.logprobs
        headers = _model_headers(variant, opened)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(
                self._stream_chat(
                    opened, variant, start, greq.request_id, created, n, want_logprobs, include_usage
                ),
                headers,
            )
        choices = {i: {"text": "", "entries": [], "finish_reason": None} for i in range(n)}
        usage = _Usage(opened)
        async for _, ev in self.merged(opened, variant, start):
            usage.add(ev)
            if ev["type"] == "delta":
                choices[ev["index"]]["text"] += ev["text"]
                choices[ev["index"]]["entries"].extend(ev.get("logprobs") or [])
            elif ev["type"] == "finish":
                choices[ev["index"]]["finish_reason"] = ev["reason"]
        out = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"],
                "logprobs": {"content": _chat_logprobs(c["entries"])} if want_logprobs else None,
            }
            for i, c in sorted(choices.items())
        ]
        return JSONResponse(
            {
                "id": greq.request_id,
                "object": "chat.completion",
                "created": created,
                "model": self.model_id,
                "choices": out,
                "usage": usage.body(),
            },
            headers=headers,
        )

    async def _stream_chat(self, opened, variant, start, rid, created, n, want_logprobs, include_usage):
        usage = _Usage(opened)

        def chunk(index: int, delta: dict, entries, finish_reason) -> dict:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_id,
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "finish_reason": finish_reason,
                        "logprobs": {"content": _chat_logprobs(entries)} if want_logprobs else None,
                    }
                ],
            }

        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""}, [], None)
        async for _, ev in self.merged(opened, variant, start):
            usage.add(ev)
            if ev["type"] == "delta" and (ev["text"] or ev.get("logprobs")):
                yield chunk(ev["index"], {"content": ev["text"]}, ev.get("logprobs") or [], None)
            elif ev["type"] == "finish":
                yield chunk(ev["index"], {}, [], ev["reason"])
        if include_usage:
            yield {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_id,
                "choices": [],
                "usage": usage.body(),
            }

    # ---- other endpoints ----
    def models_body(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "lmforge"}

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        async def one(variant: str, backend: Backend):
            try:
                return variant, await asyncio.wait_for(backend.info(), timeout=10)
            except Exception as err:  # noqa: BLE001 - readiness reports any failure as not ready
                return variant, {"error": f"{type(err).__name__}: {err}"}

        results = dict(await asyncio.gather(*(one(v, b) for v, b in self.backends.items())))
        return all("error" not in r for r in results.values()), results

    async def refresh_engine_stats(self) -> None:
        async def one(variant: str, backend: Backend):
            try:
                self.metrics.engine.update(variant, await asyncio.wait_for(backend.stats(), timeout=2))
            except Exception as err:  # noqa: BLE001 - a scrape must not fail because one replica is slow
                log.debug("stats of variant %s unavailable: %s", variant, err)

        await asyncio.gather(*(one(v, b) for v, b in self.backends.items()))

    async def reload(self, variant: str | None, force: bool) -> dict[str, Any]:
        targets = [variant] if variant else list(self.backends)
        out = {}
        for v in targets:
            result = await self.backends[v].reload(force)
            if result.get("swapped"):
                self.metrics.model_reloads.labels(v, result["model"]).inc()
            out[v] = result
        return out


class _Usage:
    def __init__(self, opened) -> None:
        self.prompt = sum(first["prompt_tokens"] for _, first in opened)
        self.completion = 0

    def add(self, event: dict) -> None:
        if event["type"] == "finish":
            self.completion += event["completion_tokens"]

    def body(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }


class ReloadRequest(BaseModel):
    model_config = {"extra": "forbid", "strict": True}
    variant: str | None = None
    force: bool = False


# ---- formatting helpers -----------------------------------------------------------------------
def _completion_logprobs(entries: list[dict | None]) -> dict[str, Any]:
    """OpenAI legacy completions format: parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
    for e in entries:
        tokens.append(e["token"])
        token_logprobs.append(e["logprob"])
        top.append({t: lp for t, lp, _ in e["top"]} if e["logprob"] is not None else None)
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(entries: list[dict]) -> list[dict[str, Any]]:
    return [
        {
            "token": e["token"],
            "logprob": e["logprob"],
            "bytes": e["bytes"],
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in e["top"]],
        }
        for e in entries
    ]


def _model_headers(variant: str, opened) -> dict[str, str]:
    versions = sorted({first["model"] for _, first in opened})
    return {"x-lmforge-variant": variant, "x-lmforge-model-version": ",".join(versions)}


def _sse(chunks: AsyncIterator[dict], headers: dict[str, str]) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as err:  # failed after the 200 was sent: report it in-band, as OpenAI does
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _aclose(agen) -> None:
    close = getattr(agen, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception as err:  # noqa: BLE001 - closing a failed stream must not hide the first error
            log.debug("closing a generation stream: %s", err)


def _backend_error(err: BaseException) -> APIError:
    """Ray back-pressure and unavailable replicas become 503 + Retry-After; anything else a 500."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, asyncio.CancelledError):
        raise err
    name = type(err).__name__
    if name in (
        "BackPressureError",
        "DeploymentUnavailableError",
        "RayActorError",
        "ActorDiedError",
        "ActorUnavailableError",
    ):
        return APIError(
            503,
            f"the model service is overloaded or restarting ({name}); retry later",
            "overloaded_error",
            code="service_unavailable",
            headers={"Retry-After": "1"},
        )
    log.exception("generation failed", exc_info=err)
    return APIError(500, f"internal error while generating ({name})", "server_error")


def parse_body(model_cls: type[BaseModel], body: bytes):
    """Validate a JSON body into `model_cls`: malformed JSON, wrong types, out-of-range values and
    unknown fields all become a 400 naming the field."""
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors) or not body.strip():
            raise bad_request(
                f"the request body is not valid JSON: {errors[0]['msg']}", code="invalid_json"
            ) from None
        if errors[0]["type"] in ("model_type", "model_attributes_type") and not errors[0]["loc"]:
            raise bad_request("the request body must be a JSON object", code="invalid_json") from None
        param = str(errors[0]["loc"][0]) if errors[0]["loc"] else None
        fields = {e["loc"][0] if e["loc"] else "" for e in errors}
        shown = errors if len(fields) > 1 else errors[:1]
        problems = "; ".join(_describe(e) for e in shown[:4])
        if len(fields) == 1 and len(errors) > 1 and errors[0]["type"] not in ("missing", "extra_forbidden"):
            problems = f"{param}: wrong type or value ({'; '.join(_describe(e) for e in errors[:4])})"
        raise bad_request(problems, param, "invalid_value") from None


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "body"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown field"
    return f"{where}: {error['msg']}"


# ---- the ASGI app -------------------------------------------------------------------------------
def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class _LimitsAndMetrics:
    """ASGI middleware: refuse bodies over `max_body_bytes` (413) before anything reads them, and
    count every response by endpoint and status with its duration (to the last byte sent)."""

    def __init__(self, app, service: APIService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope.get("path", "")
        endpoint = (
            path if path in KNOWN_PATHS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        )
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._record(scope, endpoint, status["code"], start)

        limit = self.service.cfg.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = APIError(
            413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large"
        )
        if length is not None and length.isdigit() and int(length) > limit:
            return await _error_response(too_large)(scope, receive, send_wrapper)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await _error_response(too_large)(scope, receive, send_wrapper)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body, replayed = b"".join(chunks), False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: wait for the disconnect, as Starlette expects

            return await self.app(scope, replay, send_wrapper)
        return await self.app(scope, receive, send_wrapper)

    def _record(self, scope, endpoint: str, status: int, start: float) -> None:
        m = self.service.metrics
        m.requests.labels(endpoint, str(status)).inc()
        duration = time.perf_counter() - start
        m.request_duration.labels(endpoint).observe(duration)
        state = scope.get("state") or {}
        access_log.info(
            "%s %s %d %.3fs %s",
            scope.get("method"),
            scope.get("path"),
            status,
            duration,
            state.get("key_id", "-"),
        )  # the key's fingerprint, never the key


def create_app(service: APIService) -> FastAPI:
    app = FastAPI(
        title="lmforge OpenAI-compatible API",
        version="1",
        description="OpenAI-compatible completions and chat completions served by lmforge.",
    )
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        if err.status == 503:  # overload: tell clients when to come back (configurable)
            err.headers["Retry-After"] = str(service.cfg.retry_after_s)
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException):
        return _error_response(
            APIError(err.status_code, str(err.detail), STATUS_TYPES.get(err.status_code, "server_error"))
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception):
        log.exception("unhandled error", exc_info=err)
        return _error_response(APIError(500, f"internal server error ({type(err).__name__})", "server_error"))

    def body_schema(model: type[BaseModel]) -> dict:
        return {
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
                },
            }
        }

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest), tags=["openai"])
    async def completions(request: Request):
        """Text completions (OpenAI legacy completions API), streamed as server-sent events with stream=true."""
        service.authorize(request)
        return await service.completions(parse_body(CompletionRequest, await request.body()), request)

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest), tags=["openai"])
    async def chat_completions(request: Request):
        """Chat completions rendered with the model's own chat template."""
        service.authorize(request)
        return await service.chat(parse_body(ChatCompletionRequest, await request.body()), request)

    @app.get("/v1/models", tags=["openai"])
    async def list_models(request: Request):
        service.authorize(request)
        return service.models_body()

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def get_model(model_id: str, request: Request):
        service.authorize(request)
        service.check_model(model_id)
        return service.model_card()

    @app.get("/health", tags=["operations"])
    async def health():
        """Liveness: the HTTP server answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"])
    async def ready():
        """Readiness: every model variant is loaded and answers."""
        ok, variants = await service.readiness()
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "model": service.model_id, "variants": variants},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", tags=["operations"])
    async def metrics():
        """Prometheus text format."""
        await service.refresh_engine_stats()
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/admin/reload", tags=["operations"], openapi_extra=body_schema(ReloadRequest))
    async def admin_reload(request: Request):
        """Re-resolve the model source now (registry alias) and hot-swap a new version (admin key)."""
        service.authorize(request, admin=True)
        raw = await request.body()
        body = parse_body(ReloadRequest, raw) if raw.strip() else ReloadRequest()
        if body.variant is not None and body.variant not in service.backends:
            raise bad_request(
                f"variant: unknown {body.variant!r}; this server has {sorted(service.backends)}", "variant"
            )
        return {"results": await service.reload(body.variant, body.force)}

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (CompletionRequest, ChatCompletionRequest, ReloadRequest):
                definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definition.pop("$defs", {}))
                components[model.__name__] = definition
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(_LimitsAndMetrics, service=service)
    return app
