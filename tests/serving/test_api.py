"""The HTTP API in-process (FastAPI TestClient over a ModelServer, no Ray): responses, streaming,
every bad-input case, auth, rate limits, back-pressure, metrics, A/B routing and fallback."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from lmforge.model.checkpoint import load_model_dir
from lmforge.model.generation import SamplingParams, score
from lmforge.serving.api import APIService, LocalBackend, create_app
from lmforge.serving.config import ServeConfig, build_serve_config
from lmforge.serving.model_server import ModelLoadError, ModelServer
from lmforge.serving.protocol import GenerationRequest
from lmforge.serving.runner import ModelRunner
from lmforge.serving.textgen import generate_text

MODEL = "tiny-model"


def make_config(model_dir, **values) -> ServeConfig:
    data = {
        "model": str(model_dir),
        "registry_poll_s": 0,
        "engine": {"num_slots": 4, "max_queue": 8},
    } | values
    return build_serve_config(data)


def make_client(cfg: ServeConfig, servers: dict[str, ModelServer]) -> TestClient:
    return TestClient(create_app(APIService(cfg, {v: LocalBackend(s) for v, s in servers.items()})))


@pytest.fixture(scope="module")
def server(model_dir):
    s = ModelServer(make_config(model_dir))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(model_dir, server):
    return make_client(make_config(model_dir), {"a": server})


@pytest.fixture(scope="module")
def reference(model_dir):
    """In-process generation with the same model directory: what the server must reproduce."""
    from tokenizers import Tokenizer

    model = load_model_dir(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def generate(prompt: str, max_tokens: int, stop=(), stop_token_ids=()):
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=0, stop_token_ids=tuple(stop_token_ids)
        )
        return generate_text(model, tokenizer, prompt, params, stop=stop)

    generate.model, generate.tokenizer = model, tokenizer
    return generate


def sse_events(text: str) -> list:
    """The JSON payloads of a server-sent-events body; asserts it ends with [DONE]."""
    lines = [line for line in text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


# ---- successful requests --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, max_tokens", [("The quick brown", 12), ("def add(", 20), ("Héllo wörld", 7)]
)
def test_completion_equals_in_process_generation(client, reference, prompt, max_tokens):
    r = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    expected = reference(prompt, max_tokens)
    choice = body["choices"][0]
    assert choice["text"] == expected.text
    assert choice["finish_reason"] == expected.finish_reason
    assert body["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": len(expected.token_ids),
        "total_tokens": expected.prompt_tokens + len(expected.token_ids),
    }
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert r.headers["x-lmforge-model-version"] == MODEL


def test_streaming_matches_the_full_response(client):
    request = {"model": MODEL, "prompt": "Serving language", "max_tokens": 15, "temperature": 0}
    full = client.post("/v1/completions", json=request).json()
    r = client.post(
        "/v1/completions", json=request | {"stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == full["choices"][0]["text"]
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == [
        full["choices"][0]["finish_reason"]
    ]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]


def test_chat_uses_the_tokenizer_chat_template(client, reference, model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    rendered = (
        "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        + "<|im_start|>assistant\n"
    )
    im_end = reference.tokenizer.token_to_id("<|im_end|>")
    expected = reference(rendered, 10, stop_token_ids=(im_end,))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"]["prompt_tokens"] == expected.prompt_tokens
    # content given as a list of text parts (what the OpenAI SDK also sends) renders the same
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    r2 = client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": parts, "max_tokens": 10, "temperature": 0}
    )
    assert r2.json()["choices"][0]["message"] == body["choices"][0]["message"]


def test_chat_streaming_and_logprobs(client):
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    full = client.post("/v1/chat/completions", json=request).json()
    content = full["choices"][0]["logprobs"]["content"]
    assert len(content) == full["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"]  # greedy picks the most likely token
        assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]
    events = sse_events(client.post("/v1/chat/completions", json=request | {"stream": True}).text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert streamed == full["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


def test_stop_strings_cut_the_text(client, reference):
    base = reference("The quick brown", 30)
    assert len(base.text) > 6
    stop = base.text[3:6]
    first = base.text.find(stop)
    r = client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "The quick brown",
            "max_tokens": 30,
            "temperature": 0,
            "stop": [stop, "never-appears"],
        },
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == base.text[:first] and choice["finish_reason"] == "stop"


def test_n_choices_and_seed_are_reproducible(client):
    request = {
        "model": MODEL,
        "prompt": "Private domain",
        "max_tokens": 8,
        "temperature": 1.0,
        "n": 3,
        "seed": 1234,
    }
    a, b = (client.post("/v1/completions", json=request).json() for _ in range(2))
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert 3 <= a["usage"]["completion_tokens"] <= 3 * 8  # counted over all choices


def test_batch_of_prompts_and_token_prompts(client, reference):
    ids = reference.tokenizer.encode("The quick").ids
    r = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": [[ids[0]] + ids, ids], "max_tokens": 4, "temperature": 0, "n": 2},
    )
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: both choices agree


def test_echo_with_logprobs_scores_the_prompt(client, reference):
    """What lm-evaluation-harness's local-completions loglikelihood requests send."""
    ids = [reference.model.config.bos_token_id] + reference.tokenizer.encode("The quick brown fox").ids
    r = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    expected = score(reference.model, ids[:1], ids[1:])
    assert sum(lp["token_logprobs"][1:]) == pytest.approx(expected.logprob, abs=1e-3)
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
    assert r.json()["usage"]["completion_tokens"] == 0


# ---- bad input: always a 4xx with an OpenAI error object --------------------------------------------
BAD_REQUESTS = [
    ("/v1/completions", b"{", 400, None, "invalid_json"),
    ("/v1/completions", b"", 400, None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model", None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": [99999]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 2.5}, 400, "temperature", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n", None),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "n": 9},
        400,
        "n",
        None,
    ),  # more than the engine's slots
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": -1}, 400, "seed", None),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
        None,
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop", None),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 1}},
        400,
        "logit_bias",
        "unsupported_parameter",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "suffix": "x"},
        400,
        "suffix",
        "unsupported_parameter",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "best_of": 3},
        400,
        "best_of",
        "unsupported_parameter",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "frobnicate": True}, 400, "frobnicate", None),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": 500},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 200}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages",
        None,
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages",
        None,
    ),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages", None),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        400,
        "top_logprobs",
        None,
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 300}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
        400,
        "tools",
        None,
    ),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS)
def test_bad_requests_get_4xx_error_objects(client, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"  # OpenAI's type for every client mistake, 404 included
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["message"]


def test_body_too_large_is_413(client):
    r = client.post(
        "/v1/completions",
        content=b'{"model": "x", "prompt": "' + b"a" * 1_100_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_a_body_sent_as_another_content_type_is_refused_by_name(client):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    r = client.post("/v1/completions", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_json" and "application/json" in error["message"]
    # no Content-Type at all: read as JSON, as a bare client sends it
    assert client.post("/v1/completions", content=body).status_code == 200


def test_unknown_route_and_method(client):
    assert client.get("/v2/nothing").json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"  # RFC 9110: a 405 lists what is allowed
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_the_server_survives_bad_input(client):
    """After every bad request, the same replica still generates (and answers as before)."""
    request = {"model": MODEL, "prompt": "still alive", "max_tokens": 4, "temperature": 0}
    before = client.post("/v1/completions", json=request)
    for path, body, status, _, _ in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = client.post(path, content=content, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
    after = client.post("/v1/completions", json=request)
    assert after.status_code == 200 and after.json()["choices"] == before.json()["choices"]


# ---- operations endpoints -------------------------------------------------------------------------
def test_health_ready_models_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["variants"]["a"]["model"] == MODEL
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/other").status_code == 404
    spec = client.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"} <= set(
        spec["paths"]
    )
    body_ref = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert body_ref["$ref"].endswith("/CompletionRequest")
    assert "max_tokens" in spec["components"]["schemas"]["CompletionRequest"]["properties"]


# every status each operation answers, and what it answers with (see test_openapi_fuzz.py)
DECLARED = {
    ("post", "/v1/completions"): {200, 400, 401, 404, 413, 429, 503},
    ("post", "/v1/chat/completions"): {200, 400, 401, 404, 413, 429, 503},
    ("get", "/v1/models"): {200, 401, 429},
    ("get", "/v1/models/{model_id}"): {200, 401, 404, 429},
    ("get", "/health"): {200},
    ("get", "/ready"): {200, 503},
    ("get", "/metrics"): {200},
    ("post", "/admin/reload"): {200, 400, 401, 403, 413, 429},
}


def test_openapi_declares_every_status_and_content_type(client):
    spec = client.get("/openapi.json").json()
    operations = {(m, p): op for p, ops in spec["paths"].items() for m, op in ops.items()}
    assert set(operations) == set(DECLARED)
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for key, op in operations.items():
        responses = op["responses"]
        assert {int(code) for code in responses} == DECLARED[key], key  # no FastAPI 422: errors are 400
        for code in DECLARED[key] - {200, 503 if key[1] == "/ready" else 0}:
            assert responses[str(code)]["content"] == {"application/json": {"schema": error_ref}}, (key, code)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, chunk in (
        ("/v1/completions", "CompletionChunk"),
        ("/v1/chat/completions", "ChatCompletionChunk"),
    ):
        content = operations[("post", path)]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        data = content["text/event-stream"]["itemSchema"]["properties"]["data"]
        assert {"$ref": f"#/components/schemas/{chunk}"} in data["anyOf"][0]["contentSchema"]["anyOf"]
        assert chunk in spec["components"]["schemas"]
    assert set(operations[("get", "/metrics")]["responses"]["200"]["content"]) == {"text/plain"}
    assert operations[("post", "/admin/reload")]["requestBody"].get("required") is not True  # body optional
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    # this server runs without keys, so the key is optional ({}); with keys it is required (fuzz test)
    assert operations[("post", "/v1/completions")]["security"] == [{"HTTPBearer": []}, {}]
    assert "security" not in operations[("get", "/health")]


def test_metrics_parse_with_prometheus_parser(client):
    client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "metrics", "max_tokens": 5, "temperature": 0}
    )
    client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name in (
        "lmforge_http_requests",
        "lmforge_http_request_duration_seconds",
        "lmforge_time_to_first_token_seconds",
        "lmforge_inter_token_latency_seconds",
        "lmforge_generated_tokens",
        "lmforge_engine_queue_depth",
        "lmforge_engine_running_sequences",
        "lmforge_engine_kv_cache_usage_ratio",
        "lmforge_engine_slots",
    ):
        assert name in families, name
    requests = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for s in families["lmforge_http_requests"].samples
        if s.name == "lmforge_http_requests_total"
    }
    assert requests[("/v1/completions", "200")] >= 1 and requests[("/v1/completions", "404")] >= 1
    slots = [s for s in families["lmforge_engine_slots"].samples]
    assert slots[0].value == 4 and slots[0].labels["variant"] == "a"
    generated = sum(
        s.value for s in families["lmforge_generated_tokens"].samples if s.name.endswith("_total")
    )
    assert generated >= 5


# ---- auth and limits ------------------------------------------------------------------------------
def test_api_keys_are_required_and_never_logged(model_dir, server, tmp_path, caplog):
    keys = tmp_path / "keys"
    keys.write_text("sk-test-secret-1\nsk-test-secret-2\n")
    cfg = make_config(model_dir, api_keys_file=str(keys), host="0.0.0.0")
    c = make_client(cfg, {"a": server})
    request = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    with caplog.at_level(logging.DEBUG, logger="lmforge"):
        missing = c.post("/v1/completions", json=request)
        wrong = c.post("/v1/completions", json=request, headers={"Authorization": "Bearer sk-wrong"})
        ok = c.post("/v1/completions", json=request, headers={"Authorization": "Bearer sk-test-secret-2"})
        models = c.get("/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert ok.status_code == 200 and models.status_code == 401
    assert c.get("/health").status_code == 200  # probes need no key
    assert "sk-test-secret" not in caplog.text and "sk-wrong" not in caplog.text
    assert "key-" in caplog.text  # requests are logged by key fingerprint


def test_the_key_is_checked_before_the_body_schema(model_dir, server, tmp_path):
    """An unauthenticated client learns nothing about the schema: 401 before any 400."""
    keys = tmp_path / "keys"
    keys.write_text("sk-test-secret\n")
    c = make_client(make_config(model_dir, api_keys_file=str(keys)), {"a": server})
    r = c.post("/v1/completions", json={"model": MODEL, "prompt": 42, "frobnicate": True})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"


def test_rate_limit_per_key(model_dir, server):
    c = make_client(make_config(model_dir, rate_limit_per_minute=2), {"a": server})
    request = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    statuses = [c.post("/v1/completions", json=request).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    r = c.post("/v1/completions", json=request)
    assert r.json()["error"]["type"] == "rate_limit_error" and int(r.headers["Retry-After"]) >= 1


def _slow_down(runner: ModelRunner, seconds: float) -> None:
    """Make each engine step take a while, so a request stays in flight long enough to observe."""
    step = runner.engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    runner.engine.step = slow_step


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_queue_full_is_503_with_retry_after(model_dir):
    cfg = make_config(model_dir, engine={"num_slots": 1, "max_queue": 1}, retry_after_s=2)
    s = ModelServer(cfg)
    try:
        _slow_down(s.current, 0.02)
        c = make_client(cfg, {"a": s})

        async def hold(prompt: str):
            agen = s.generate(
                GenerationRequest(
                    f"hold-{prompt}",
                    prompt=prompt,
                    max_tokens=100,
                    sampling={"temperature": 0.0, "ignore_eos": True},
                )
            )
            assert (await agen.__anext__())["type"] == "start"
            return agen

        loop = asyncio.new_event_loop()
        first = loop.run_until_complete(hold("one"))
        _wait_for(lambda: s.current.engine.num_running == 1)
        second = loop.run_until_complete(hold("two"))  # waits in the queue
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "three", "max_tokens": 2})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "overloaded_error" and r.headers["Retry-After"] == "2"
        for agen in (first, second):
            loop.run_until_complete(agen.aclose())
        _wait_for(lambda: s.current.engine.num_running == 0 and s.current.engine.num_waiting == 0)
        assert (
            c.post("/v1/completions", json={"model": MODEL, "prompt": "four", "max_tokens": 2}).status_code
            == 200
        )
        loop.close()
    finally:
        s.close()


def test_disconnect_cancels_generation_and_frees_the_slot(model_dir):
    s = ModelServer(make_config(model_dir))
    try:
        _slow_down(s.current, 0.01)

        async def partial_read():
            agen = s.generate(
                GenerationRequest(
                    "gone", prompt="hello", max_tokens=120, sampling={"temperature": 0.0, "ignore_eos": True}
                )
            )
            kinds = [(await agen.__anext__())["type"] for _ in range(3)]
            await agen.aclose()  # what a client disconnect does to the stream
            return kinds

        assert asyncio.run(partial_read()) == ["start", "delta", "delta"]
        _wait_for(lambda: s.current.engine.num_running == 0)
        stats = s.stats()
        assert stats["aborted"] == 1 and stats["running"] == 0
    finally:
        s.close()


# ---- A/B split and fallback ------------------------------------------------------------------------
def test_ab_split_routes_by_weight_and_sticks_per_user(model_dir, model_dir_v2, server):
    cfg = make_config(model_dir, ab_test={"model": str(model_dir_v2), "weight": 0.5})
    b = ModelServer(cfg, "b")
    try:
        c = make_client(cfg, {"a": server, "b": b})
        variants = [
            c.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 1}).headers[
                "x-lmforge-variant"
            ]
            for _ in range(40)
        ]
        assert 5 <= variants.count("b") <= 35  # weight 0.5: both versions get traffic
        sticky = {
            c.post(
                "/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 1, "user": "alice"}
            ).headers["x-lmforge-variant"]
            for _ in range(10)
        }
        assert len(sticky) == 1
        ready = c.get("/ready").json()
        assert set(ready["variants"]) == {"a", "b"}
    finally:
        b.close()


def test_fallback_model_when_the_primary_cannot_load(model_dir, tmp_path):
    cfg = make_config(tmp_path / "missing-model", fallback_model=str(model_dir))
    s = ModelServer(cfg)
    try:
        info = s.info()
        assert info["serving_fallback"] and info["model"] == MODEL and "does not exist" in info["last_error"]
    finally:
        s.close()
    with pytest.raises(ModelLoadError, match="missing-model"):
        ModelServer(make_config(tmp_path / "missing-model"))
