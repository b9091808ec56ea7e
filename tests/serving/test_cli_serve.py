"""`lmforge serve`: flags, the secure default, the Serve config YAML, and the model checks that come
before Ray starts (nothing is started here; tests/serving/test_serve_shutdown.py runs the server)."""

from __future__ import annotations

import pytest
import torch
import yaml

from lmforge.cli import build_parser, main
from lmforge.errors import UserError
from lmforge.serving.app import check_models, root_cause
from lmforge.serving.config import build_serve_config


def test_serve_is_a_registered_command():
    args = build_parser().parse_args(["serve", "--model", "out/model", "--port", "9001"])
    assert args.command == "serve" and args.model == "out/model" and args.port == 9001


def test_non_loopback_without_keys_is_refused_before_starting(tmp_path, capsys):
    code = main(["serve", "--model", str(tmp_path), "--host", "0.0.0.0"])
    assert code == 2
    assert "--allow-unauthenticated" in capsys.readouterr().err


def test_bad_config_names_the_field(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path), "--set", "engine.num_slots=0"]) == 2
    assert "engine.num_slots" in capsys.readouterr().err
    assert main(["serve"]) == 2  # no model anywhere
    assert "model" in capsys.readouterr().err


def test_write_serve_config(tmp_path):
    out = tmp_path / "serve_config.yaml"
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("engine:\n  num_slots: 16\nrate_limit_per_minute: 60\n")
    assert (
        main(
            [
                "serve",
                "--model",
                "models:/bot@champion",
                "--config",
                str(cfg_file),
                "--host",
                "0.0.0.0",
                "--allow-unauthenticated",
                "--set",
                "replicas=2",
                "--write-serve-config",
                str(out),
            ]
        )
        == 0
    )
    doc = yaml.safe_load(out.read_text())
    cfg = build_serve_config(doc["applications"][0]["args"])
    assert (cfg.model, cfg.engine.num_slots, cfg.replicas, cfg.rate_limit_per_minute) == (
        "models:/bot@champion",
        16,
        2,
        60,
    )
    assert cfg.allow_unauthenticated and doc["http_options"]["host"] == "0.0.0.0"


# ---- the model is checked before Ray starts ------------------------------------------------------
@pytest.fixture()
def no_ray(monkeypatch):
    """Fail the test if anything tries to start Ray: these errors must come before it."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called before the model was checked")

    monkeypatch.setattr(ray, "init", refuse)


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured
    return lines[0]


def test_missing_model_directory_is_one_line_before_ray(tmp_path, capsys, no_ray):
    assert main(["serve", "--model", str(tmp_path / "nonexistent")]) == 2
    line = _one_line_error(capsys)
    assert line == f"lmforge serve: error: model directory {tmp_path / 'nonexistent'} does not exist"


def test_incomplete_model_directory_is_one_line_before_ray(tmp_path, model_dir, capsys, no_ray):
    assert main(["serve", "--model", str(tmp_path)]) == 2  # an empty directory
    assert "config.json is missing" in _one_line_error(capsys)
    partial = tmp_path / "no-tokenizer"
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        (partial / name).write_bytes((model_dir / name).read_bytes())
    assert main(["serve", "--model", str(partial)]) == 2
    assert "has no tokenizer.json" in _one_line_error(capsys)


def test_unknown_registry_alias_is_one_line_before_ray(registry, capsys, no_ray):
    uri = f"models:/{registry.name}@nosuch"
    assert main(["serve", "--model", uri, "--set", f"tracking_uri={registry.tracking_uri}"]) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"lmforge serve: error: cannot resolve {uri} in the registry") and "nosuch" in line
    assert (
        main(
            [
                "serve",
                "--model",
                "models:/no-such-model@champion",
                "--set",
                f"tracking_uri={registry.tracking_uri}",
            ]
        )
        == 2
    )
    assert "no-such-model" in _one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_engine_device_absent_here_is_one_line_before_ray(model_dir, capsys, no_ray):
    assert main(["serve", "--model", str(model_dir), "--set", "engine.device=cuda"]) == 2
    assert _one_line_error(capsys).startswith("lmforge serve: error: engine.device cuda: no CUDA device")


def test_a_missing_model_with_a_loadable_fallback_is_a_warning(tmp_path, model_dir):
    cfg = build_serve_config({"model": str(tmp_path / "gone"), "fallback_model": str(model_dir)})
    warnings = check_models(cfg, local=True)
    assert len(warnings) == 1 and "does not exist" in warnings[0] and str(model_dir) in warnings[0]
    cfg = build_serve_config({"model": str(tmp_path / "gone"), "fallback_model": str(tmp_path / "gone2")})
    with pytest.raises(UserError, match="and its fallback"):
        check_models(cfg, local=True)


def test_on_a_cluster_directories_are_left_to_the_replicas(tmp_path, registry):
    """With RAY_ADDRESS the replicas read paths on their own nodes; the registry is still checked."""
    assert check_models(build_serve_config({"model": str(tmp_path / "on-the-cluster")}), local=False) == []
    cfg = build_serve_config({"model": "models:/tiny@nosuch", "tracking_uri": registry.tracking_uri})
    with pytest.raises(UserError, match="nosuch"):
        check_models(cfg, local=False)


def test_root_cause_of_a_replica_traceback():
    message = (
        "The deployment failed to start 3 times in a row. See controller logs for details. Error:\n"
        "Traceback (most recent call last):\n"
        '  File "serving/model_server.py", line 99, in _load_initial\n'
        "safetensors_rust.SafetensorError: Error while deserializing header: invalid header length\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n"
        '  File "serving/model_server.py", line 103, in _load_initial\n'
        "    raise ModelLoadError(f'cannot load model {self.source}: {primary_error}') from err\n"
        "lmforge.serving.model_server.ModelLoadError: cannot load model /m: SafetensorError: invalid header\n"
    )
    assert root_cause(message) == "ModelLoadError: cannot load model /m: SafetensorError: invalid header"
    assert root_cause("replica died\n") == "replica died"


def test_a_registry_that_does_not_exist_yet_is_one_line_and_not_created(tmp_path, capsys, no_ray):
    db = tmp_path / "never-created" / "mlflow.db"
    code = main(["serve", "--model", "models:/bot@champion", "--set", f"tracking_uri=sqlite:///{db}"])
    assert code == 2
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and "there is no model registry at" in lines[0], lines
    assert not db.exists()  # reading never creates an empty store
