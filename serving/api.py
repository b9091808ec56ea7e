"""The OpenAI-compatible HTTP API (FastAPI), independent of Ray.

`create_app(service)` builds the ASGI app; `APIService` holds what a router needs: the config, the
authenticator and rate limiter, the metrics, and one `Backend` per model variant. A backend is
either a Ray Serve handle to a model deployment (serving/app.py) or a `ModelServer` in this
process (`LocalBackend`, used by the fast tests), so the HTTP behaviour is tested without Ray.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{id}], GET /health
(liveness), GET /ready (every variant answers), GET /metrics (Prometheus text), POST /admin/reload
(admin key), GET /openapi.json and /docs.

Bodies are the pydantic models of serving/http_models.py: FastAPI validates requests with them and
documents requests, responses and every status an operation answers in /openapi.json. The
OpenAI objects are built from the replicas' events by serving/openai_format.py.

Request order: body size (middleware) -> JSON syntax -> API key -> rate limit -> schema -> model
id -> unsupported fields -> the replica's own checks (context length, sampling ranges). Every
refusal is an OpenAI error object {"error": {"message", "type", "param", "code"}} with a 4xx
status (400 for any invalid body, as OpenAI; never FastAPI's 422); 503/429 carry Retry-After, 405
carries Allow.
"""

from __future__ import annotations

import asyncio
import email.message
import logging
import random
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Annotated, Any, Protocol

from fastapi import Body, Depends, FastAPI, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serving import openai_format
from lmforge.serving.auth import Authenticator, AuthError, Principal, RateLimiter
from lmforge.serving.config import ServeConfig
from lmforge.serving.http_models import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    Readiness,
    ReloadRequest,
    ReloadResponse,
)
from lmforge.serving.metrics import CONTENT_TYPE, SequenceTimer, ServingMetrics
from lmforge.serving.protocol import APIError, GenerationRequest, bad_request

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

    def check_model(self, model: str) -> str | None:
        """The adapter a request's `model` selects: None for the base (`BASE`), NAME for `BASE:NAME`;
        any other id is a 404 naming the ones served."""
        ids = self.cfg.adapter_ids
        if model not in ids:
            available = ", ".join(repr(i) for i in ids)
            raise APIError(
                404,
                f"model {model!r} is not served here; available: {available} (GET /v1/models)",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return ids[model]

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
            except BaseException as err:  # delivered to the consumer, which re-raises
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

    # ---- /v1/completions and /v1/chat/completions ----
    async def completions(self, body: CompletionRequest) -> Response:
        adapter = self.check_model(body.model)
        body.check_unsupported()
        stops = body.stop_list()
        max_tokens = body.max_tokens if body.max_tokens is not None else self.cfg.default_max_tokens
        requests = [
            GenerationRequest(
                f"cmpl-{uuid.uuid4().hex}",
                prompt=p,
                max_tokens=max_tokens,
                sampling=body.sampling(),
                stop=stops,
                logprobs=body.logprobs,
                echo=body.echo,
                adapter=adapter,
            )
            for p in body.prompts()
        ]
        fmt = openai_format.CompletionFormat(body.echo, logprobs=body.logprobs is not None)
        return await self.answer(body, requests, fmt)

    async def chat(self, body: ChatCompletionRequest) -> Response:
        adapter = self.check_model(body.model)
        body.check_unsupported()
        messages = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in body.messages
        ]
        request = GenerationRequest(
            f"chatcmpl-{uuid.uuid4().hex}",
            messages=messages,
            max_tokens=body.token_limit(),
            sampling=body.sampling(),
            stop=body.stop_list(),
            logprobs=body.engine_logprobs(),
            adapter=adapter,
        )
        return await self.answer(body, [request], openai_format.ChatFormat(logprobs=body.logprobs))

    async def answer(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        requests: list[GenerationRequest],
        fmt: openai_format.Format,
    ) -> Response:
        """Run the requests on one variant and answer with the whole response or, with
        `stream`, with server-sent events as the tokens come (both endpoints)."""
        start = time.perf_counter()
        # an adapter is served on top of version A only: no A/B split for adapter requests
        variant = self.choose_variant(body.user) if requests[0].adapter is None else "a"
        opened = await self.open_all(variant, requests)
        reply = openai_format.Reply(
            requests[0].request_id, body.model, body.n, [first for _, first in opened]
        )
        headers = _model_headers(variant, opened)
        events = self.merged(opened, variant, start)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(openai_format.stream(fmt, reply, events, include_usage), headers)
        return _json(await openai_format.collect(fmt, reply, events), headers=headers)

    # ---- other endpoints ----
    def models(self) -> ModelList:
        return ModelList(data=[self.model_card(model_id) for model_id in self.cfg.adapter_ids])

    def model_card(self, model_id: str | None = None) -> ModelCard:
        """The base model's card, or an adapter's (`BASE:NAME`, with `parent` the base's id)."""
        model_id = model_id or self.model_id
        parent = self.model_id if self.cfg.adapter_ids.get(model_id) else None
        return ModelCard(id=model_id, created=self.created, owned_by="lmforge", parent=parent)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        async def one(variant: str, backend: Backend):
            try:
                return variant, await asyncio.wait_for(backend.info(), timeout=10)
            except Exception as err:  # readiness reports any failure as not ready
                return variant, {"error": f"{type(err).__name__}: {err}"}

        results = dict(await asyncio.gather(*(one(v, b) for v, b in self.backends.items())))
        return all("error" not in r for r in results.values()), results

    async def refresh_engine_stats(self) -> None:
        async def one(variant: str, backend: Backend):
            try:
                self.metrics.engine.update(variant, await asyncio.wait_for(backend.stats(), timeout=2))
            except Exception as err:  # a scrape must not fail because one replica is slow
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


# ---- helpers ------------------------------------------------------------------------------------
def _model_headers(variant: str, opened) -> dict[str, str]:
    versions = sorted({first["model"] for _, first in opened})
    return {"x-lmforge-variant": variant, "x-lmforge-model-version": ",".join(versions)}


def _json(model: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(), status_code, headers, media_type="application/json")


def _sse(chunks: AsyncIterator[BaseModel], headers: dict[str, str]) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except APIError as err:  # failed after the 200 was sent: report it in-band, as OpenAI does
            yield f"data: {_error_body(err).model_dump_json()}\n\n"
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
        except Exception as err:  # closing a failed stream must not hide the first error
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


def validation_error(err: RequestValidationError, content_type: str | None) -> APIError:
    """FastAPI's validation errors as OpenAI's 400 naming the field: malformed JSON, a body that is
    not a JSON object, wrong types, out-of-range values and unknown fields."""
    errors = [{**e, "loc": _field_path(e["loc"])} for e in err.errors()]
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", first["msg"])
        where = f" (at character {first['loc'][0]})" if first["loc"] else ""
        return bad_request(f"the request body is not valid JSON: {reason}{where}", code="invalid_json")
    if not first["loc"]:  # the body as a whole
        if first["type"] == "missing":
            message = "the request body is empty; send a JSON object"
        elif not _is_json(content_type):
            message = f"send the body as JSON with 'Content-Type: application/json', not {content_type!r}"
        else:
            message = "the request body must be a JSON object"
        return bad_request(message, code="invalid_json")
    param = str(first["loc"][0])
    fields = {e["loc"][0] if e["loc"] else "" for e in errors}
    shown = errors if len(fields) > 1 else errors[:1]
    problems = "; ".join(_describe(e) for e in shown[:4])
    if len(fields) == 1 and len(errors) > 1 and first["type"] not in ("missing", "extra_forbidden"):
        problems = f"{param}: wrong type or value ({'; '.join(_describe(e) for e in errors[:4])})"
    return bad_request(problems, param, "invalid_value")


def _field_path(loc: tuple) -> tuple:
    """A location inside the body, without FastAPI's leading "body"."""
    return tuple(loc[1:]) if loc[:1] == ("body",) else tuple(loc)


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # parsed as JSON (strict_content_type=False)
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "body"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown field"
    return f"{where}: {error['msg']}"


# ---- the ASGI app -------------------------------------------------------------------------------
def _error_body(err: APIError) -> ErrorResponse:
    return ErrorResponse.model_validate(err.body())


def _error_response(err: APIError) -> Response:
    return _json(_error_body(err), err.status, err.headers)


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


# ---- what the OpenAPI document declares -----------------------------------------------------------
ERROR_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, wrong type or value, unknown or unsupported field, "
    "prompt longer than the context",
    401: "Missing or invalid API key",
    403: "The endpoint needs an admin API key",
    404: "Unknown model id (nor BASE:ADAPTER of a served adapter)",
    413: "Body over `max_body_bytes`",
    429: "The key's rate limit is reached (Retry-After says when to retry)",
    503: "The model service is overloaded or restarting (Retry-After says when to retry)",
}
SCHEMAS = "#/components/schemas/"


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


def _event_stream(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 of a generation endpoint: JSON (the response model), or with `stream: true`
    server-sent events whose `data` is a chunk, an in-band error, then `[DONE]` (OpenAPI 3.2's
    `itemSchema`, as FastAPI writes for its own event streams)."""
    payload = {"anyOf": [{"$ref": SCHEMAS + chunk.__name__}, {"$ref": SCHEMAS + ErrorResponse.__name__}]}
    data = {
        "anyOf": [
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
            {"const": "[DONE]"},
        ]
    }
    item = {"type": "object", "required": ["data"], "properties": {"data": data}}
    description = "The whole answer as JSON, or with `stream: true` server-sent events ending with `[DONE]`"
    return {200: {"description": description, "content": {"text/event-stream": {"itemSchema": item}}}}


def _document(app: FastAPI, open_access: bool) -> dict[str, Any]:
    """FastAPI's document plus what it cannot infer: the stream chunk models (referenced from an
    `itemSchema` only), no 422 entries (validation errors are OpenAI's 400 here), and an API key
    made optional (`{}`) on a server that runs without keys."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (CompletionChunk, ChatCompletionChunk):
        definition = model.model_json_schema(mode="serialization", ref_template=SCHEMAS + "{model}")
        for name, sub in definition.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = definition
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if open_access and "security" in operation:
                operation["security"].append({})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


# ---- the app -------------------------------------------------------------------------------------
# API keys: declared as HTTP bearer auth in the document; the check is APIService.authorize.
_bearer = HTTPBearer(auto_error=False, description="An API key (see the README's Authentication)")
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


async def _api_key(request: Request, _: _Credentials) -> Principal:
    return request.app.state.service.authorize(request)


async def _admin_key(request: Request, _: _Credentials) -> Principal:
    return request.app.state.service.authorize(request, admin=True)


APIKey = Annotated[Principal, Depends(_api_key)]
AdminKey = Annotated[Principal, Depends(_admin_key)]


def create_app(service: APIService) -> FastAPI:
    app = FastAPI(
        title="lmforge OpenAI-compatible API",
        version="1",
        description="OpenAI-compatible completions and chat completions served by lmforge.",
        strict_content_type=False,  # a JSON body without a Content-Type header is still JSON
    )
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        if err.status == 503:  # overload: tell clients when to come back (configurable)
            err.headers["Retry-After"] = str(service.cfg.retry_after_s)
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return _error_response(validation_error(err, request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException):
        error_type = STATUS_TYPES.get(err.status_code, "server_error")
        return _error_response(APIError(err.status_code, str(err.detail), error_type, headers=err.headers))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception):
        log.exception("unhandled error", exc_info=err)
        return _error_response(APIError(500, f"internal server error ({type(err).__name__})", "server_error"))

    @app.post(
        "/v1/completions",
        tags=["openai"],
        response_model=CompletionResponse,
        responses=_event_stream(CompletionChunk) | _errors(400, 401, 404, 413, 429, 503),
    )
    async def completions(body: CompletionRequest, _: APIKey) -> Response:
        """Text completions (OpenAI's legacy completions API); server-sent events with stream=true."""
        return await service.completions(body)

    @app.post(
        "/v1/chat/completions",
        tags=["openai"],
        response_model=ChatCompletionResponse,
        responses=_event_stream(ChatCompletionChunk) | _errors(400, 401, 404, 413, 429, 503),
    )
    async def chat_completions(body: ChatCompletionRequest, _: APIKey) -> Response:
        """Chat completions rendered with the model's own chat template."""
        return await service.chat(body)

    @app.get("/v1/models", tags=["openai"], response_model=ModelList, responses=_errors(401, 429))
    async def list_models(_: APIKey) -> ModelList:
        return service.models()

    @app.get(
        "/v1/models/{model_id:path}",
        tags=["openai"],
        response_model=ModelCard,
        responses=_errors(401, 404, 429),
    )
    async def get_model(model_id: str, _: APIKey) -> ModelCard:
        service.check_model(model_id)
        return service.model_card(model_id)

    @app.get("/health", tags=["operations"], response_model=Health)
    async def health() -> Health:
        """Liveness: the HTTP server answers."""
        return Health()

    @app.get(
        "/ready",
        tags=["operations"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "A variant is not loaded or does not answer"}},
    )
    async def ready(response: Response) -> Readiness:
        """Readiness: every model variant is loaded and answers."""
        ok, variants = await service.readiness()
        response.status_code = 200 if ok else 503
        return Readiness(status="ready" if ok else "not ready", model=service.model_id, variants=variants)

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        await service.refresh_engine_stats()
        return PlainTextResponse(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.post(
        "/admin/reload",
        tags=["operations"],
        response_model=ReloadResponse,
        responses=_errors(400, 401, 403, 413, 429),
    )
    async def admin_reload(
        _: AdminKey,
        body: Annotated[ReloadRequest | None, Body()] = None,
    ) -> ReloadResponse:
        """Re-resolve the model source now (registry alias) and hot-swap a new version (admin key)."""
        body = body or ReloadRequest()
        if body.variant is not None and body.variant not in service.backends:
            raise bad_request(
                f"variant: unknown {body.variant!r}; this server has {sorted(service.backends)}", "variant"
            )
        return ReloadResponse(results=await service.reload(body.variant, body.force))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, service.auth.open_access)
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(_LimitsAndMetrics, service=service)
    return app
