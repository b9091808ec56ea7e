"""LoRA adapters through the real server: Ray Serve on 127.0.0.1, one model deployment serving the base
and two adapters, Serve's model multiplexing with at most ONE adapter loaded per replica.

Shows what only the deployed app can: the adapter id travels as Serve's multiplexed model id, each
request's output equals the adapter merged into the base in this process, the LRU evicts and reloads
across requests, and concurrent requests for different adapters (forcing evictions while others run)
all get their own adapter's output. The in-process behaviour is tests/serving/test_adapters.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import torch
from _net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL = "tiny-model"
PROMPT, MAX_TOKENS = "The quick brown", 10


def make_adapter(root: Path, model_dir: Path, name: str, seed: int, targets: tuple[str, ...]) -> Path:
    """A PEFT LoRA adapter made with peft on the lmforge model, lora_B perturbed so outputs change."""
    from peft import LoraConfig, get_peft_model

    from lmforge.model.checkpoint import load_model_dir

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        load_model_dir(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=list(targets))
    )
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.3)
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(root / name, save_embedding_layers=False)
    return root / name


def wait_for(condition, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)
    return value


def _get(url: str) -> httpx.Response:
    try:
        return httpx.get(url, timeout=30)
    except httpx.HTTPError:
        return httpx.Response(599)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-adapters")
    return {
        "one": make_adapter(root, model_dir, "one", 1, ("q_proj", "v_proj")),
        "two": make_adapter(root, model_dir, "two", 2, ("q_proj", "k_proj", "v_proj", "o_proj")),
    }


@pytest.fixture(scope="module")
def expected(model_dir, adapters) -> dict[str, str]:
    """Greedy text of PROMPT per model id: the base, and each adapter merged into it in this process."""
    from peft import PeftModel
    from tokenizers import Tokenizer

    from lmforge.model.checkpoint import load_model_dir
    from lmforge.model.generation import SamplingParams
    from lmforge.serving.textgen import generate_text

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    models = {MODEL: load_model_dir(model_dir)}
    for name, path in adapters.items():
        models[f"{MODEL}:{name}"] = PeftModel.from_pretrained(
            load_model_dir(model_dir), str(path)
        ).merge_and_unload()
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0)
    out = {
        model_id: generate_text(m.eval(), tokenizer, PROMPT, params).text for model_id, m in models.items()
    }
    assert len(set(out.values())) == 3, out  # the adapters change the output
    return out


@pytest.fixture(scope="module")
def served(ray_local, model_dir, adapters):
    from ray import serve

    from lmforge.serving.app import build_app
    from lmforge.serving.config import build_serve_config

    port = free_port()
    cfg = build_serve_config(
        {
            "model": str(model_dir),
            "registry_poll_s": 0,
            "port": port,
            "engine": {"num_slots": 2, "max_queue": 16},
            "num_cpus": 0,
            "router_num_cpus": 0,
            "adapters": {name: str(path) for name, path in adapters.items()},
            "max_adapters_per_replica": 1,
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="lmforge", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _get(f"{url}/ready").status_code == 200)
    yield url
    serve.delete("lmforge")
    serve.shutdown()


def complete(url: str, model_id: str) -> httpx.Response:
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def loaded(url: str) -> list[str]:
    return _get(f"{url}/ready").json()["variants"]["a"]["adapters_loaded"]


def test_each_request_gets_its_adapter_and_the_lru_holds_one(served, expected):
    assert loaded(served) == []  # nothing is loaded before a request asks for it
    for model_id, after in [
        (f"{MODEL}:one", ["one"]),
        (f"{MODEL}:two", ["two"]),  # max_adapters_per_replica=1: "one" evicted
        (MODEL, ["two"]),  # the base is always there
        (f"{MODEL}:one", ["one"]),  # loaded again on demand
    ]:
        r = complete(served, model_id)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model_id
        assert r.json()["choices"][0]["text"] == expected[model_id], model_id
        assert loaded(served) == after, model_id


def test_models_and_unknown_adapter(served):
    data = httpx.get(f"{served}/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [
        (MODEL, None),
        (f"{MODEL}:one", MODEL),
        (f"{MODEL}:two", MODEL),
    ]
    r = complete(served, f"{MODEL}:three")
    assert r.status_code == 404
    assert (
        r.json()["error"]["code"] == "model_not_found"
        and r.json()["error"]["type"] == "invalid_request_error"
    )


def test_concurrent_requests_for_different_adapters(served, expected):
    """Requests for the base and both adapters at once, with room for one adapter: evictions happen
    while other requests run, and every answer is still its own model's."""
    ids = [MODEL, f"{MODEL}:one", f"{MODEL}:two"] * 3

    async def run():
        async with httpx.AsyncClient(timeout=300) as c:
            body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
            return await asyncio.gather(
                *(c.post(f"{served}/v1/completions", json=body | {"model": m}) for m in ids)
            )

    for model_id, r in zip(ids, asyncio.run(run()), strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected[model_id], model_id
    assert len(loaded(served)) == 1
