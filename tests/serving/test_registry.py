"""The MLflow registry (real MLflow, sqlite): resolve and download models:/NAME@ALIAS, follow an
alias move by polling or by an explicit reload, and hot-swap without dropping a request in flight."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from lmforge.registry import RegistryError, parse_model_uri
from lmforge.serving.api import APIService, LocalBackend, create_app
from lmforge.serving.config import build_serve_config
from lmforge.serving.model_server import ModelServer
from lmforge.serving.protocol import GenerationRequest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
]  # MLflow's first sqlite database takes several seconds to create


def server_config(registry, tmp_path, **values):
    return build_serve_config(
        {
            "model": "models:/tiny@champion",
            "tracking_uri": registry.tracking_uri,
            "model_cache_dir": str(tmp_path / "cache"),
            "registry_poll_s": 0,
            "engine": {"num_slots": 2, "max_queue": 4},
        }
        | values
    )


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_parse_resolve_and_download(registry, tmp_path):
    assert parse_model_uri("models:/tiny@champion").alias == "champion"
    assert parse_model_uri("models:/team/tiny/3").name == "team/tiny"
    for bad in ("models:/tiny", "models:/@x", "runs:/abc/model", "models:/tiny/latest"):
        with pytest.raises(RegistryError):
            parse_model_uri(bad)
    version = registry.client.resolve("models:/tiny@champion")
    assert (version.name, version.version, version.label) == ("tiny", "1", "tiny/1")
    local = registry.client.download(version, tmp_path)
    assert (local / "config.json").is_file() and (local / "tokenizer.json").is_file()
    assert registry.client.download(version, tmp_path) == local  # cached: downloaded once
    assert registry.client.aliases("tiny") == {"champion": "1"}
    assert registry.client.versions("tiny") == ["1", "2"]
    with pytest.raises(RegistryError, match="no-such-alias"):
        registry.client.resolve("models:/tiny@no-such-alias")


def test_alias_move_hot_swaps_without_dropping_the_request_in_flight(registry, tmp_path):
    server = ModelServer(server_config(registry, tmp_path))
    try:
        assert server.info()["model"] == "tiny/1"
        old = server.current
        step = old.engine.step

        def slow_step():  # keep the first request generating while the swap happens
            time.sleep(0.01)
            return step()

        old.engine.step = slow_step

        async def scenario():
            agen = server.generate(
                GenerationRequest(
                    "long",
                    prompt="The quick",
                    max_tokens=80,
                    sampling={"temperature": 0.0, "ignore_eos": True},
                )
            )
            start = await agen.__anext__()
            assert start["model"] == "tiny/1"
            registry.client.set_alias("tiny", "champion", 2)
            result = await asyncio.to_thread(server.reload)
            assert result["swapped"] and result["model"] == "tiny/2"
            assert old.engine.num_running == 1  # the first request is still generating on version 1
            assert server.info()["draining"] == [{"model": "tiny/1", "active_requests": 1}]
            new = [
                e
                async for e in server.generate(
                    GenerationRequest("new", prompt="The quick", max_tokens=3, sampling={"temperature": 0.0})
                )
            ]
            assert new[0]["model"] == "tiny/2"
            rest = [e async for e in agen]
            return rest

        rest = asyncio.run(scenario())
        finish = [e for e in rest if e["type"] == "finish"]
        assert finish == [{"type": "finish", "index": 0, "reason": "length", "completion_tokens": 80}]
        wait_for(lambda: old.driver._thread is None)  # the old engine stopped once its request ended
        assert server.info()["draining"] == [] and server.reloads == 1
        assert server.reload()["swapped"] is False  # alias unchanged: nothing to do
    finally:
        registry.client.set_alias("tiny", "champion", 1)
        server.close()


def test_polling_follows_the_alias_and_admin_reload(registry, tmp_path, monkeypatch):
    cfg = server_config(registry, tmp_path, registry_poll_s=0.2)
    server = ModelServer(cfg)
    try:
        registry.client.promote("tiny", 2, "champion")  # what `lmforge registry promote` does
        wait_for(lambda: server.current.info.label == "tiny/2")
        assert registry.client.rollback("tiny", "champion").version == "1"  # `lmforge registry rollback`
        wait_for(lambda: server.current.info.label == "tiny/1")
    finally:
        server.close()
    # the admin endpoint: only admin keys may trigger a reload
    monkeypatch.setenv("LMFORGE_API_KEYS", "user-key")
    monkeypatch.setenv("LMFORGE_ADMIN_API_KEYS", "admin-key")
    server = ModelServer(server_config(registry, tmp_path))
    try:
        client = TestClient(
            create_app(APIService(server_config(registry, tmp_path), {"a": LocalBackend(server)}))
        )
        assert client.post("/admin/reload").status_code == 401
        assert client.post("/admin/reload", headers={"Authorization": "Bearer user-key"}).status_code == 403
        registry.client.set_alias("tiny", "champion", 2)
        r = client.post("/admin/reload", headers={"Authorization": "Bearer admin-key"})
        assert r.status_code == 200, r.text
        assert r.json()["results"]["a"] | {"error": None} == {
            "variant": "a",
            "before": "tiny/1",
            "model": "tiny/2",
            "swapped": True,
            "error": None,
        }
        assert (
            client.post(
                "/admin/reload", json={"variant": "z"}, headers={"Authorization": "Bearer admin-key"}
            ).status_code
            == 400
        )
    finally:
        registry.client.set_alias("tiny", "champion", 1)
        server.close()


def test_registry_fallback(registry, tmp_path):
    server = ModelServer(
        server_config(registry, tmp_path, model="models:/tiny@missing", fallback_model="models:/tiny/2")
    )
    try:
        info = server.info()
        assert info["serving_fallback"] and info["model"] == "tiny/2" and "missing" in info["last_error"]
    finally:
        server.close()
