"""The real server: Ray Serve on 127.0.0.1 (one start for the module), a model from the MLflow
registry, API keys from a secret file, and the official `openai` client.

Covers what only the deployed app can show: Serve routing and streaming, auth in the replica,
metrics from the model replicas, client disconnects cancelling generation across processes,
concurrent requests matching in-process generation, and an alias move picked up by polling while
a request is in flight."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from _net import free_port
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.slow, pytest.mark.integration]

openai = pytest.importorskip("openai")

KEY = "sk-lmforge-test-0123456789"
MODEL = "tiny"


def wait_for(condition, timeout: float = 120.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every)


@pytest.fixture(scope="module")
def served(ray_local, registry, tmp_path_factory):
    from ray import serve

    from lmforge.serving.app import build_app
    from lmforge.serving.config import build_serve_config

    root = tmp_path_factory.mktemp("serve")
    keys = root / "keys"
    keys.write_text(f"# test keys\n{KEY}\n")
    port = free_port()
    cfg = build_serve_config(
        {
            "model": f"models:/{MODEL}@champion",
            "tracking_uri": registry.tracking_uri,
            "model_cache_dir": str(root / "cache"),
            "registry_poll_s": 0.5,
            "api_keys_file": str(keys),
            "port": port,
            "engine": {"num_slots": 4, "max_queue": 32},
            "num_cpus": 0,
            "router_num_cpus": 0,
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="lmforge", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _get(f"{url}/ready").status_code == 200)
    yield url
    serve.delete("lmforge")
    serve.shutdown()


def _get(url: str, **kw) -> httpx.Response:
    try:
        return httpx.get(url, timeout=30, **kw)
    except httpx.HTTPError:
        return httpx.Response(599)


@pytest.fixture(scope="module")
def reference(registry):
    """Greedy generation in this process with version 1's model directory."""
    from tokenizers import Tokenizer

    from lmforge.model.checkpoint import load_model_dir
    from lmforge.model.generation import SamplingParams
    from lmforge.serving.textgen import generate_text

    model_dir = registry.versions["1"]
    model = load_model_dir(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def generate(prompt: str, max_tokens: int):
        return generate_text(
            model, tokenizer, prompt, SamplingParams(max_new_tokens=max_tokens, temperature=0)
        )

    return generate


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key=KEY, timeout=120, max_retries=0)


def test_openai_client_completions_chat_and_streaming(client, reference):
    assert [m.id for m in client.models.list().data] == [MODEL]
    completion = client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=12, temperature=0
    )
    expected = reference("The quick brown", 12)
    assert completion.choices[0].text == expected.text
    assert completion.usage.completion_tokens == len(expected.token_ids)
    streamed = client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected.text

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_auth_is_enforced_by_the_replica(served):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served}/v1", api_key="sk-wrong", max_retries=0).models.list()
    r = httpx.post(f"{served}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert _get(f"{served}/health").status_code == 200


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        (b"{not json", 400, None, "invalid_json"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", None),
        ({"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
        ({"model": MODEL, "prompt": "word " * 1100}, 400, "prompt", "context_length_exceeded"),
        ({"model": MODEL, "prompt": "x" * 1_100_000}, 413, None, "body_too_large"),
    ],
)
def test_bad_input_is_4xx_through_serve(served, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        f"{served}/v1/completions",
        content=content,
        timeout=60,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if code:
        assert error["code"] == code


def test_concurrent_requests_all_succeed_and_match_in_process_generation(served, reference):
    prompts = [(f"Request {i}: the quick brown", 6 + (i % 5) * 3) for i in range(12)]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{served}/v1", api_key=KEY, timeout=120, max_retries=0) as c:
            return await asyncio.gather(
                *(
                    c.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
                    for p, n in prompts
                )
            )

    results = asyncio.run(run())
    for (prompt, n), result in zip(prompts, results, strict=True):
        expected = reference(prompt, n)
        assert result.choices[0].text == expected.text, prompt
        assert result.choices[0].finish_reason == expected.finish_reason


def _metrics(url: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(_get(f"{url}/metrics").text)}


def _engine_value(families: dict, name: str) -> float:
    return sum(
        s.value
        for s in families[name].samples
        if s.labels.get("variant") == "a" and not s.name.endswith("_created")
    )


def test_metrics_come_from_the_replicas(served, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4)
    families = _metrics(served)
    statuses = {
        s.labels["status"]
        for s in families["lmforge_http_requests"].samples
        if s.name == "lmforge_http_requests_total" and s.labels["endpoint"] == "/v1/completions"
    }
    assert "200" in statuses
    slots = families["lmforge_engine_slots"].samples
    assert slots and slots[0].value == 4 and slots[0].labels["model"] == "tiny/1"
    assert slots[0].labels["replica"] != "local"  # reported by the Serve replica itself
    assert families["lmforge_time_to_first_token_seconds"].samples


def test_client_disconnect_cancels_generation(served):
    before = _engine_value(_metrics(served), "lmforge_engine_requests_aborted")
    request = {
        "model": MODEL,
        "prompt": "a long story",
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{served}/v1/completions",
        json=request,
        timeout=60,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # the stream is closed: the replica must cancel the engine request and free its slot
    wait_for(lambda: _engine_value(_metrics(served), "lmforge_engine_requests_aborted") >= before + 1)
    wait_for(lambda: _engine_value(_metrics(served), "lmforge_engine_running_sequences") == 0)


def test_alias_move_is_picked_up_without_dropping_the_request_in_flight(served, registry):
    headers = {"Authorization": f"Bearer {KEY}"}
    request = {
        "model": MODEL,
        "prompt": "The quick",
        "max_tokens": 1000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        with httpx.stream(
            "POST", f"{served}/v1/completions", json=request, headers=headers, timeout=300
        ) as r:
            assert r.status_code == 200 and r.headers["x-lmforge-model-version"] == "tiny/1"
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: ")
            registry.client.set_alias(MODEL, "champion", 2)  # promotion of version 2
            ready = wait_for(
                lambda: (lambda b: b if b["variants"]["a"]["model"] == "tiny/2" else None)(
                    _get(f"{served}/ready").json()
                ),
                every=0.1,
            )
            # the swap happened while the first request was still generating on version 1
            assert ready["variants"]["a"]["draining"] == [{"model": "tiny/1", "active_requests": 1}]
            new = httpx.post(
                f"{served}/v1/completions",
                headers=headers,
                timeout=60,
                json={"model": MODEL, "prompt": "new", "max_tokens": 2},
            )
            assert new.status_code == 200 and new.headers["x-lmforge-model-version"] == "tiny/2"
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert finishes == ["length"]
        assert events[-1]["usage"]["completion_tokens"] == 1000  # nothing dropped
    finally:
        registry.client.set_alias(MODEL, "champion", 1)
        wait_for(lambda: _get(f"{served}/ready").json()["variants"]["a"]["model"] == "tiny/1")
