"""LoRA adapters served per request, in-process (FastAPI TestClient over a ModelServer, no Ray): the
`model` field selects BASE or BASE:NAME, outputs match the adapter applied in-process by peft, requests
for different adapters running at the same time do not mix, the LRU bound, and every bad adapter
refused before Ray starts. tests/serving/test_adapters_ray.py runs the same through Ray Serve."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import ray
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.model.checkpoint import load_model_dir
from lmforge.model.config import ConfigError
from lmforge.model.generation import SamplingParams
from lmforge.serving.adapters import parse_adapter_args
from lmforge.serving.api import APIService, LocalBackend, create_app
from lmforge.serving.app import check_models
from lmforge.serving.config import build_serve_config
from lmforge.serving.model_server import ModelServer
from lmforge.serving.protocol import GenerationRequest
from lmforge.serving.textgen import generate_text

MODEL = "tiny-model"
PROMPTS = [("The quick brown", 10), ("def add(", 8)]


def make_adapter(
    root: Path, model_dir: Path, name: str, seed: int, targets=("q_proj", "v_proj"), base: str | None = None
) -> Path:
    """A PEFT LoRA adapter made with peft directly on the lmforge model; lora_B perturbed (it starts at
    zero) so the adapter changes the outputs. `base` is recorded as base_model_name_or_path."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        load_model_dir(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=list(targets))
    )
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.3)
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir) if base is None else base
    out = root / name
    # save_embedding_layers=False: peft's "auto" would read the recorded base through transformers
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return out


def lora_reference(model_dir: Path, adapter_dir: Path, merge: bool):
    """The base with the adapter applied in-process by peft: unmerged (LoRA layers computing B·A·x at
    every step) or merged into the weights."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_model_dir(model_dir), str(adapter_dir))
    return (peft_model.merge_and_unload() if merge else peft_model.get_base_model()).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "one": make_adapter(root, model_dir, "one", seed=1),
        "two": make_adapter(root, model_dir, "two", seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    }


@pytest.fixture(scope="module")
def expected(model_dir, adapters):
    """Greedy text per (model id, prompt): the base, and each adapter applied by peft in-process."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    models = {MODEL: load_model_dir(model_dir)}
    for name, path in adapters.items():
        models[f"{MODEL}:{name}"] = lora_reference(model_dir, path, merge=False)
        merged = lora_reference(model_dir, path, merge=True)
        for prompt, n in PROMPTS:  # sanity: merged and unmerged LoRA agree
            params = SamplingParams(max_new_tokens=n, temperature=0)
            assert (
                generate_text(merged, tokenizer, prompt, params).text
                == generate_text(models[f"{MODEL}:{name}"], tokenizer, prompt, params).text
            )
    out = {}
    with torch.inference_mode():
        for model_id, model in models.items():
            for prompt, n in PROMPTS:
                params = SamplingParams(max_new_tokens=n, temperature=0)
                out[model_id, prompt] = generate_text(model, tokenizer, prompt, params).text
    return out


def make_config(model_dir, adapters, **values):
    data = {
        "model": str(model_dir),
        "registry_poll_s": 0,
        "engine": {"num_slots": 4, "max_queue": 8},
        "adapters": {k: str(v) for k, v in adapters.items()},
    } | values
    return build_serve_config(data)


@pytest.fixture(scope="module")
def server(model_dir, adapters):
    s = ModelServer(make_config(model_dir, adapters))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(model_dir, adapters, server):
    return TestClient(create_app(APIService(make_config(model_dir, adapters), {"a": LocalBackend(server)})))


# ---- selection by the model field ---------------------------------------------------------------------
def test_each_model_id_answers_with_its_own_weights(client, expected):
    ids = [MODEL, f"{MODEL}:one", f"{MODEL}:two"]
    for prompt, n in PROMPTS:
        texts = {}
        for model_id in ids:
            r = client.post(
                "/v1/completions",
                json={"model": model_id, "prompt": prompt, "max_tokens": n, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == model_id
            assert body["choices"][0]["text"] == expected[model_id, prompt], (model_id, prompt)
            texts[model_id] = body["choices"][0]["text"]
            version = r.headers["x-lmforge-model-version"]
            assert version == (MODEL if model_id == MODEL else f"{MODEL}:{model_id.split(':')[1]}")
        assert len(set(texts.values())) == 3, texts  # the adapters really change the outputs


def test_chat_and_streaming_with_an_adapter(client, expected):
    prompt, n = PROMPTS[0]
    body = {"model": f"{MODEL}:two", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    r = client.post("/v1/completions", json=body)
    chunks = [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: {")]
    assert (
        "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected[f"{MODEL}:two", prompt]
    )
    assert {c["model"] for c in chunks} == {f"{MODEL}:two"}
    chat = client.post(
        "/v1/chat/completions",
        json={"model": f"{MODEL}:one", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
    )
    assert chat.status_code == 200 and chat.json()["model"] == f"{MODEL}:one"


def test_concurrent_requests_for_different_adapters_do_not_mix(server, expected):
    """Base and both adapters at once: each runs in its own engine, so each equals its reference."""

    async def one(i: int, model_id: str, prompt: str, n: int) -> str:
        adapter = model_id.split(":")[1] if ":" in model_id else None
        request = GenerationRequest(
            f"r-{i}",
            prompt=prompt,
            max_tokens=n,
            sampling={"temperature": 0.0},
            adapter=adapter,
        )
        text = ""
        async for event in server.generate(request):
            assert event["type"] != "error", event
            text += event.get("text", "")
        return text

    async def run():
        jobs = [(m, p, n) for m in (MODEL, f"{MODEL}:one", f"{MODEL}:two") for p, n in PROMPTS] * 2
        return jobs, await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))

    jobs, texts = asyncio.run(run())
    for (model_id, prompt, _), text in zip(jobs, texts, strict=True):
        assert text == expected[model_id, prompt], (model_id, prompt)


def test_models_lists_base_and_adapters(client):
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [
        (MODEL, None),
        (f"{MODEL}:one", MODEL),
        (f"{MODEL}:two", MODEL),
    ]
    card = client.get(f"/v1/models/{MODEL}:two").json()
    assert card["id"] == f"{MODEL}:two" and card["parent"] == MODEL


@pytest.mark.parametrize("model_id", [f"{MODEL}:three", "other:one", f"{MODEL}:", "one"])
def test_unknown_adapter_is_404_in_openai_shape(client, model_id):
    r = client.post("/v1/completions", json={"model": model_id, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
    assert error["param"] == "model" and f"'{MODEL}:one'" in error["message"]
    assert client.get(f"/v1/models/{model_id}").status_code == 404


def test_lru_keeps_at_most_max_adapters_loaded(model_dir, adapters, expected):
    server = ModelServer(make_config(model_dir, adapters, max_adapters_per_replica=1))
    app = TestClient(create_app(APIService(server.cfg, {"a": LocalBackend(server)})))
    prompt, n = PROMPTS[0]

    def ask(model_id: str) -> str:
        r = app.post(
            "/v1/completions", json={"model": model_id, "prompt": prompt, "max_tokens": n, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    try:
        assert ask(f"{MODEL}:one") == expected[f"{MODEL}:one", prompt]
        assert server.info()["adapters_loaded"] == ["one"]
        first = server._adapter_runners()[0]
        assert ask(f"{MODEL}:two") == expected[f"{MODEL}:two", prompt]
        assert server.info()["adapters_loaded"] == ["two"]  # "one" evicted ...
        assert first._retired  # ... and its engine stops (nothing was running on it)
        deadline = time.monotonic() + 30
        while first.driver._thread is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.driver._thread is None  # EngineDriver.stop() joined its thread
        assert ask(f"{MODEL}:one") == expected[f"{MODEL}:one", prompt]  # and loaded again on demand
        assert server.info()["adapters_loaded"] == ["one"]
        assert ask(MODEL) == expected[MODEL, prompt]  # the base is not an adapter: nothing evicted
        assert server.info()["adapters_loaded"] == ["one"]
        assert server.stats()["num_slots"] == 8  # the base's engine + one adapter engine
    finally:
        server.close()


def test_adapters_follow_a_hot_swapped_base(model_dir, adapters, expected):
    server = ModelServer(make_config(model_dir, adapters))
    prompt, n = PROMPTS[0]

    async def ask(adapter: str) -> str:
        request = GenerationRequest(
            "r", prompt=prompt, max_tokens=n, sampling={"temperature": 0.0}, adapter=adapter
        )
        return "".join([e.get("text", "") async for e in server.generate(request)])

    try:
        assert asyncio.run(ask("one")) == expected[f"{MODEL}:one", prompt]
        before = server._adapter_runners()[0]
        assert server.reload(force=True)["swapped"]
        assert asyncio.run(ask("one")) == expected[f"{MODEL}:one", prompt]
        after = server._adapter_runners()[0]
        assert after is not before and before._retired  # re-merged into the new base runner
    finally:
        server.close()


# ---- configuration and bad adapters: refused before Ray starts ----------------------------------------
def test_adapter_flags_and_config():
    assert parse_adapter_args(["a=x", "b.2=/y/z"]) == {"a": "x", "b.2": "/y/z"}
    for bad, words in [
        (["a"], "NAME=DIR"),
        (["a="], "NAME=DIR"),
        (["a:b=x"], "adapter name"),
        (["a=x", "a=y"], "twice"),
    ]:
        with pytest.raises(UserError, match=words):
            parse_adapter_args(bad)
    with pytest.raises(ConfigError, match="adapters"):
        build_serve_config({"model": "m", "adapters": {"bad name": "x"}})
    with pytest.raises(ConfigError, match="max_adapters_per_replica"):
        build_serve_config({"model": "m", "max_adapters_per_replica": 0})
    cfg = build_serve_config({"model": "out/m", "adapters": {"x": "d"}, "served_model_name": "bot"})
    assert cfg.adapter_ids == {"bot": None, "bot:x": "x"}


def _tamper(src: Path, dst: Path, *, config=None, rename=None) -> Path:
    """A copy of an adapter with its config edited or its tensor names rewritten."""
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(cfg | (config or {})))
    tensors = load_file(src / "adapter_model.safetensors")
    if rename:
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.fixture(scope="module")
def other_base_adapter(tmp_path_factory, tokenizer_dir) -> Path:
    """An adapter trained on a wider model (d_model 128): it cannot fit the 64-wide test model."""
    from lmforge.components.tokenizer import TokenizerInfo
    from lmforge.model.checkpoint import save_model_dir
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    root = tmp_path_factory.mktemp("other-base")
    info = TokenizerInfo.from_dir(tokenizer_dir)
    wide = save_model_dir(
        Transformer(ModelConfig.from_name("tiny", vocab_size=info.vocab_size, d_model=128, max_seq_len=64)),
        root / "wide-model",
        tokenizer_dir=tokenizer_dir,
    )
    return make_adapter(root, wide, "wide-adapter", seed=3, base=MODEL)


@pytest.fixture
def no_ray_start(monkeypatch):
    """Fail on any attempt to start Ray; yields whether the session's shared Ray was already up (other
    tests may have started it), which must not change."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the bad input was refused")

    was_up = ray.is_initialized()
    monkeypatch.setattr(ray, "init", refuse)
    yield was_up
    assert ray.is_initialized() == was_up


def test_bad_adapters_are_refused_before_ray_starts(
    tmp_path, model_dir, adapters, other_base_adapter, no_ray_start
):
    one = adapters["one"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "bin-only").mkdir()
    (tmp_path / "bin-only" / "adapter_config.json").write_text((one / "adapter_config.json").read_text())
    (tmp_path / "bin-only" / "adapter_model.bin").write_bytes(b"pickle")
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "adapter_config.json").write_text("{not json")
    cases = [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "adapter_config.json is missing"),
        (tmp_path / "bad-json", "not valid JSON"),
        (
            tmp_path / "bin-only",
            "adapter_model.safetensors is missing (found adapter_model.bin (pickle: refused))",
        ),
        (_tamper(one, tmp_path / "ia3", config={"peft_type": "IA3"}), "only LoRA adapters"),
        (
            _tamper(one, tmp_path / "other-base", config={"base_model_name_or_path": "/models/SmolLM2-135M"}),
            "trained on base '/models/SmolLM2-135M', but the served model is 'tiny-model'",
        ),
        (
            _tamper(one, tmp_path / "wrong-module", rename=("q_proj", "qkv_proj")),
            "does not have as a Linear layer; valid target modules: down_proj, gate_proj, k_proj, "
            "lm_head, o_proj",
        ),
        (other_base_adapter, "trained for a different base model"),
    ]
    for path, message in cases:
        cfg = make_config(model_dir, {"x": path})
        with pytest.raises(UserError) as err:
            check_models(cfg, local=True)
        assert message in str(err.value), (path, str(err.value))
        assert f"adapter x ({path})" in str(err.value) or "trained on base" in str(err.value)
    # the recorded base may be the same model under another path: its directory name matches
    ok = _tamper(one, tmp_path / "moved-base", config={"base_model_name_or_path": f"/elsewhere/{MODEL}"})
    check_models(make_config(model_dir, {"x": ok}), local=True)
    # ... and check_adapter_base: false skips the name check (never the shape check)
    other = tmp_path / "other-base"
    check_models(make_config(model_dir, {"x": other}, check_adapter_base=False), local=True)
    with pytest.raises(UserError, match="different base model"):
        check_models(make_config(model_dir, {"x": other_base_adapter}, check_adapter_base=False), local=True)


def test_cli_refuses_a_bad_adapter_before_ray_starts(tmp_path, model_dir, capsys, no_ray_start):
    assert main(["serve", "--model", str(model_dir), "--adapter", f"x={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert "adapter x" in err and "does not exist" in err and "Traceback" not in err
    assert main(["serve", "--model", str(model_dir), "--adapter", "x"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


def test_write_serve_config_carries_the_adapters(tmp_path, model_dir, adapters):
    import yaml

    out = tmp_path / "serve_config.yaml"
    code = main(
        [
            "serve",
            "--model",
            str(model_dir),
            "--adapter",
            f"one={adapters['one']}",
            "--set",
            "max_adapters_per_replica=3",
            "--write-serve-config",
            str(out),
        ]
    )
    assert code == 0
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    assert args["adapters"] == {"one": str(adapters["one"])} and args["max_adapters_per_replica"] == 3


def test_an_adapter_registered_in_mlflow_is_served_by_its_uri(tmp_path, model_dir, adapters, expected):
    """`adapters: {reg: models:/NAME@ALIAS}`: resolved and downloaded (checked before Ray starts, and
    again by the replica that loads it), then served like a directory."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("adapters", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(adapters["one"]), "adapter")
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("fox-adapter")
    version = client.create_model_version(
        "fox-adapter", source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id
    )
    client.set_registered_model_alias("fox-adapter", "champion", version.version)
    cache = str(tmp_path / "cache")
    cfg = make_config(
        model_dir, {"reg": "models:/fox-adapter@champion"}, tracking_uri=uri, model_cache_dir=cache
    )
    assert check_models(cfg, local=True) == []
    assert check_models(cfg, local=False) == []  # on a cluster: resolved only
    server = ModelServer(cfg)
    try:
        app = TestClient(create_app(APIService(server.cfg, {"a": LocalBackend(server)})))
        prompt, n = PROMPTS[0]
        r = app.post(
            "/v1/completions",
            json={"model": f"{MODEL}:reg", "prompt": prompt, "max_tokens": n, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected[f"{MODEL}:one", prompt]
    finally:
        server.close()
    # refused before Ray starts: an alias that does not exist, and a version that holds no adapter
    missing = make_config(
        model_dir, {"x": "models:/fox-adapter@nope"}, tracking_uri=uri, model_cache_dir=cache
    )
    with pytest.raises(UserError, match="cannot resolve models:/fox-adapter@nope"):
        check_models(missing, local=False)
    not_adapter = client.create_model_version(
        "fox-adapter", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    wrong = make_config(
        model_dir,
        {"x": f"models:/fox-adapter/{not_adapter.version}"},
        tracking_uri=uri,
        model_cache_dir=cache,
    )
    with pytest.raises(UserError, match=r"holds no LoRA adapter \(adapter_config.json missing\)"):
        check_models(wrong, local=True)
