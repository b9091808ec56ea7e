"""Registered versions are real MLflow Models (pyfunc flavor over the lmforge engine), carry lineage,
and move between aliases through gated promotion and rollback; `lmforge registry` drives the same.

Real MLflow (sqlite + local artifacts), real `mlflow models serve` over HTTP; nothing is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from _net import free_port, stop_process, wait_http

from lmforge.cli import main
from lmforge.registry import PromotionRefused, RegistryClient, RegistryError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def make_model_dir(root: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A tiny random model over the tiny test tokenizer (as tests/serving/conftest.py makes them)."""
    import torch

    from lmforge.components.tokenizer import TokenizerInfo
    from lmforge.model.checkpoint import save_model_dir
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    info = TokenizerInfo.from_dir(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name(
        "tiny",
        vocab_size=info.vocab_size,
        max_seq_len=128,
        init_std=0.3,
        bos_token_id=info.bos_id,
        eos_token_id=info.eos_id,
        pad_token_id=info.pad_id,
    )
    return save_model_dir(Transformer(cfg).eval(), root / f"model-{seed}", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("reg-model"), tokenizer_dir, 0)


@pytest.fixture(scope="module")
def bot(tmp_path_factory, model_dir):
    """Registry "bot": v1 (champion at registration, gate passed), v2 (gate passed), v3 (gate failed)."""
    root = tmp_path_factory.mktemp("reg-mlflow")
    client = RegistryClient(f"sqlite:///{root / 'mlflow.db'}")
    lineage = {
        "data_hash": "d" * 64,
        "tokenizer_hash": "t" * 64,
        "base_model": "none",
        "pipeline_run_id": "r1",
    }
    client.register_model_dir(model_dir, "bot", alias="champion", lineage=lineage, gate=True)
    client.register_model_dir(model_dir, "bot", lineage=lineage, gate=True)
    client.register_model_dir(
        model_dir, "bot", alias="challenger", lineage={"data_hash": "e" * 64}, gate=False
    )
    return client


def greedy(model_dir: Path, prompt: str, n: int) -> str:
    from lmforge.model.generation import SamplingParams
    from lmforge.serving.textgen import generate_from_dir

    return generate_from_dir(model_dir, prompt, SamplingParams(max_new_tokens=n, temperature=0.0)).text


# ---- the MLflow Model -------------------------------------------------------------------------
def test_version_is_an_mlflow_pyfunc_model_backed_by_the_engine(bot, model_dir, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(bot.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/bot@champion")
    meta = model.metadata
    assert meta.flavors["python_function"]["loader_module"] == "lmforge.serving.mlflow_model"
    assert [c.name for c in meta.get_input_schema().inputs] == ["prompt", "messages"]
    assert {p.name: p.default for p in meta.get_params_schema().params} == {
        "max_tokens": 64,
        "temperature": 0.0,
    }

    out = model.predict(pd.DataFrame({"prompt": ["Hello", "The quick"]}), params={"max_tokens": 6})
    assert out == [greedy(model_dir, "Hello", 6), greedy(model_dir, "The quick", 6)]  # same as `generate`
    assert model.predict({"prompt": "Hello"}, params={"max_tokens": 6}) == out[:1]
    chat = model.predict(
        [{"messages": [{"role": "user", "content": "hi"}]}], params={"max_tokens": 4, "temperature": 0.7}
    )
    assert len(chat) == 1 and isinstance(chat[0], str)
    with pytest.raises(Exception, match="exactly one of 'prompt'"):
        model.predict([{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}])
    with pytest.raises(Exception, match="must be one string"):  # MLflow reads this as one row
        model.predict({"prompt": ["a", "b"]})

    # the same artifact is still a plain lmforge model directory for `lmforge serve` / `evaluate`
    local = bot.download(bot.resolve("models:/bot/1"), tmp_path / "cache")
    assert (local / "config.json").is_file() and (local / "MLmodel").is_file()
    assert (local / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


def test_versions_carry_lineage_and_gate(bot):
    info = bot.list_models("bot")[0]
    assert info.aliases == {"champion": "1", "challenger": "3"}
    v1, _, v3 = info.versions
    assert v1.lineage["data_hash"] == "d" * 64 and v1.lineage["pipeline_run_id"] == "r1"
    assert v1.lineage["code_version"]  # defaults to the lmforge version
    assert (v1.gate, v3.gate) == ("passed", "failed") and v1.aliases == ["champion"]
    run = bot.client.get_run(bot.resolve("models:/bot/1").run_id)
    assert run.data.tags["tokenizer_hash"] == "t" * 64  # the registering run carries the lineage too


def test_bad_registrations_and_versions_are_user_errors(bot, model_dir, tmp_path):
    with pytest.raises(RegistryError, match="unknown lineage keys"):
        bot.register_model_dir(model_dir, "bot", lineage={"data_sha": "x"})
    with pytest.raises(RegistryError, match="config.json missing"):
        bot.register_model_dir(tmp_path, "bot")
    with pytest.raises(RegistryError, match="no version 99"):
        bot.promote("bot", 99)
    with pytest.raises(RegistryError, match="must be a number"):
        bot.promote("bot", "latest")
    with pytest.raises(RegistryError, match="no registered model 'nobody'"):
        bot.list_models("nobody")


def test_cached_download_is_not_taken_from_another_store(tmp_path, model_dir, tokenizer_dir):
    """Version 1 of a name in a registry made afresh (`make clean`, a new sqlite store) is another
    model than the cached version 1 of the old store: it is downloaded again, not reused."""
    cache, other = tmp_path / "cache", make_model_dir(tmp_path, tokenizer_dir, 1)
    for i, source in enumerate((model_dir, other)):
        registry = RegistryClient(f"sqlite:///{tmp_path / f'store{i}.db'}", str(tmp_path / f"art{i}"))
        registry.register_model_dir(source, "same")
        local = registry.download(registry.resolve("models:/same/1"), cache)
        assert (local / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


# ---- promotion and rollback -------------------------------------------------------------------
def test_promote_refuses_failed_gate_unless_forced_and_rollback_walks_history(tmp_path, model_dir):
    client = RegistryClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.register_model_dir(model_dir, "m", alias="champion", gate=True)  # v1
    client.register_model_dir(model_dir, "m", gate=True)  # v2
    client.register_model_dir(model_dir, "m", gate=False)  # v3
    move = client.promote("m", 2)
    assert (move.version, move.previous, move.forced) == ("2", "1", False)
    with pytest.raises(PromotionRefused, match="failed its evaluation gate"):
        client.promote("m", 3, "champion")
    assert client.aliases("m")["champion"] == "2"
    move = client.promote("m", 3, "champion", force=True, reason="hotfix")
    assert move.forced and client.aliases("m")["champion"] == "3"
    note = json.loads(client.client.get_model_version("m", "3").tags["forced_promotion.champion"])
    assert note["reason"] == "hotfix" and note["previous"] == "2"
    assert client.list_models("m")[0].alias_history["champion"] == ["1", "2", "3"]

    assert client.rollback("m").version == "2"
    assert client.rollback("m", "champion").version == "1"
    assert client.aliases("m")["champion"] == "1"
    with pytest.raises(RegistryError, match="no earlier holder"):
        client.rollback("m")
    with pytest.raises(RegistryError, match="no alias 'staging'"):
        client.rollback("m", "staging")


# ---- the CLI ----------------------------------------------------------------------------------
def test_registry_cli_list_promote_rollback(tmp_path, model_dir, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = RegistryClient(uri)
    client.register_model_dir(model_dir, "cli", alias="champion", gate=True, lineage={"data_hash": "abc"})
    client.register_model_dir(model_dir, "cli", alias="challenger", gate=False)
    client.client.set_model_version_tag("cli", "2", "eval.demo.bits_per_byte", "2.5")
    base = ["registry", "--tracking-uri", uri]

    assert main([*base, "list"]) == 0
    out = capsys.readouterr().out
    assert "cli  (aliases: challenger=2, champion=1)" in out
    assert "demo.bits_per_byte=2.5" in out and "failed" in out and "data_hash=abc" in out

    assert main([*base, "promote", "cli", "2", "--alias", "champion"]) == 2
    err = capsys.readouterr().err
    assert "failed its evaluation gate" in err and "--force" in err and err.count("\n") == 1
    assert main([*base, "promote", "cli", "2", "--alias", "champion", "--force", "--reason", "demo"]) == 0
    assert "forced" in capsys.readouterr().out
    assert main([*base, "list", "cli", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["aliases"]["champion"] == "2"
    assert main(["registry", "rollback", "cli", "--alias", "champion", "--tracking-uri", uri]) == 0
    assert "version 2 -> version 1" in capsys.readouterr().out
    assert client.aliases("cli")["champion"] == "1"

    missing = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    assert main(["registry", "--tracking-uri", missing, "list"]) == 2
    assert "no model registry at" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


# ---- `mlflow models serve` --------------------------------------------------------------------


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_models_serve_answers_invocations(bot, model_dir, tmp_path):
    port = free_port()
    bin_dir = Path(sys.executable).parent  # `mlflow models serve` execs uvicorn from PATH (the venv)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": bot.tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    mlflow_cli = bin_dir / "mlflow"
    cmd = [str(mlflow_cli), "models", "serve", "-m", "models:/bot@champion", "--env-manager", "local"]
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [*cmd, "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env, stdout=log, stderr=log, cwd=tmp_path
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=300)
        out = post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_records": [{"prompt": "Hello"}], "params": {"max_tokens": 6}},
        )
        assert out == {"predictions": [greedy(model_dir, "Hello", 6)]}
        chat = post(
            f"http://127.0.0.1:{port}/invocations",
            {
                "dataframe_records": [{"messages": [{"role": "user", "content": "hi"}]}],
                "params": {"max_tokens": 3},
            },
        )
        assert len(chat["predictions"]) == 1
    finally:
        stop_process(proc)
        log.close()
