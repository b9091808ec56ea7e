"""ServeConfig validation, the Serve config YAML, API keys and rate limits (no model, no Ray)."""

from __future__ import annotations

import pytest
import yaml

from lmforge.model.config import ConfigError
from lmforge.serving.app import serve_config, serve_config_yaml
from lmforge.serving.auth import (
    AuthConfigError,
    Authenticator,
    AuthError,
    RateLimiter,
    fingerprint,
    read_keys,
)
from lmforge.serving.config import ServeConfig, build_serve_config, is_loopback, load_serve_config


def test_defaults_and_derived_values(tmp_path):
    cfg = ServeConfig(model=str(tmp_path / "my-model"))
    assert cfg.host == "127.0.0.1" and cfg.port == 8000
    assert cfg.model_id == "my-model"
    assert cfg.model_max_ongoing_requests == cfg.engine.num_slots + cfg.engine.max_queue
    assert ServeConfig(model="models:/bot@champion").model_id == "bot"
    assert ServeConfig(model="models:/bot/3", served_model_name="x").model_id == "x"


@pytest.mark.parametrize(
    "data, field",
    [
        ({}, "model"),
        ({"model": "models:/bot"}, "model"),
        ({"model": "models:/@alias"}, "model"),
        ({"model": "m", "port": 70000}, "port"),
        ({"model": "m", "engine": {"num_slots": 0}}, "engine.num_slots"),
        ({"model": "m", "engine": {"dtype": "int3"}}, "engine.dtype"),
        ({"model": "m", "ab_test": {"model": "models:/b@x", "weight": 1.5}}, "ab_test.weight"),
        ({"model": "m", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling.max_replicas"),
        ({"model": "m", "rate_limit_per_minute": -1}, "rate_limit_per_minute"),
        ({"model": "m", "max_queued_requests": 0}, "max_queued_requests"),
        ({"model": "m", "no_such_field": 1}, "no_such_field"),
    ],
)
def test_invalid_configs_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_serve_config(data)


def test_load_with_file_overrides_and_flags(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text(
        "model: models:/bot@champion\nengine:\n  num_slots: 4\nab_test:\n  model: models:/bot@challenger\n"
        "  weight: 0.25\n"
    )
    cfg = load_serve_config(f, overrides=["engine.max_queue=3"], port=9000, host=None)
    assert (cfg.engine.num_slots, cfg.engine.max_queue, cfg.port, cfg.host) == (4, 3, 9000, "127.0.0.1")
    assert cfg.variants == {"a": "models:/bot@champion", "b": "models:/bot@challenger"}


def test_serve_config_yaml_round_trips_into_the_app_args(tmp_path, repo_root):
    cfg = ServeConfig(model="models:/bot@champion", host="0.0.0.0", api_keys_file="/secrets/keys")
    doc = yaml.safe_load(serve_config_yaml(cfg))
    app = doc["applications"][0]
    assert app["import_path"] == "lmforge.serving.app:app_builder"
    assert build_serve_config(app["args"]) == cfg
    assert doc["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert serve_config(cfg)["applications"][0]["args"] == app["args"]
    # the static example shipped for `serve run` / KubeRay is valid too
    example = yaml.safe_load((repo_root / "serving" / "serve_config.yaml").read_text())
    for application in example["applications"]:
        assert application["import_path"] == "lmforge.serving.app:app_builder"
        build_serve_config(application["args"])


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_keys_from_env_and_secret_file(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# team keys\nkey-from-file\n\nsecond-key  # rotated 2026-11\nk1\n")
    monkeypatch.setenv("LMF_TEST_KEYS", " k1 , k2,,")
    assert read_keys("LMF_TEST_KEYS", f) == ["k1", "k2", "key-from-file", "second-key"]
    with pytest.raises(AuthConfigError, match="cannot read"):
        read_keys("LMF_TEST_KEYS", tmp_path / "missing")


def test_secure_default_refuses_open_non_loopback(tmp_path):
    open_local = Authenticator.from_config(ServeConfig(model="m"))
    assert open_local.open_access and "loopback" in open_local.describe("127.0.0.1")
    with pytest.raises(AuthConfigError, match="allow-unauthenticated"):
        Authenticator.from_config(ServeConfig(model="m", host="0.0.0.0"))
    assert Authenticator.from_config(
        ServeConfig(model="m", host="0.0.0.0", allow_unauthenticated=True)
    ).open_access
    keyfile = tmp_path / "keys"
    keyfile.write_text("secret-1\n")
    auth = Authenticator.from_config(ServeConfig(model="m", host="0.0.0.0", api_keys_file=str(keyfile)))
    assert not auth.open_access and "secret-1" not in auth.describe("0.0.0.0")


def test_bearer_checks_and_admin_keys():
    auth = Authenticator(["user-key"], ["admin-key"], open_access=False)
    assert auth.check("Bearer user-key").key_id == fingerprint("user-key")
    assert "user-key" not in fingerprint("user-key")
    for header in (None, "", "Bearer", "Basic user-key", "Bearer wrong"):
        with pytest.raises(AuthError) as err:
            auth.check(header)
        assert err.value.status == 401
    with pytest.raises(AuthError) as err:
        auth.check("Bearer user-key", admin=True)
    assert err.value.status == 403
    assert auth.check("Bearer admin-key", admin=True).admin
    assert auth.check("bearer admin-key").admin  # admins may also call the API


def test_rate_limiter_token_bucket():
    now = [0.0]
    limiter = RateLimiter(per_minute=2, clock=lambda: now[0])
    assert limiter.acquire("a") == 0 and limiter.acquire("a") == 0
    wait = limiter.acquire("a")
    assert wait >= 1  # seconds until the next request is allowed (Retry-After)
    assert limiter.acquire("b") == 0  # buckets are per key
    now[0] += 30.0  # half a minute refills one request
    assert limiter.acquire("a") == 0
    assert RateLimiter(0).acquire("a") == 0  # 0 = unlimited
