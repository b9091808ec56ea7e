"""`lmforge serve`: flags, the secure default, and the Serve config YAML (nothing is started)."""

from __future__ import annotations

import yaml

from lmforge.cli import build_parser, main
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
