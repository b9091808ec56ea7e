"""Schema-driven fuzzing of the HTTP API with schemathesis: requests generated from /openapi.json
(valid ones, invalid ones, and methods the document does not list) against the real app in
process, with API keys on. No answer may be a server error or anything the document does not
declare: status code, content type, body schema (each server-sent event of a stream included),
405 with Allow for undeclared methods, 401 without a key.

Bounded (a few examples per operation) so it runs in CI; a failure prints the request to replay.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from lmforge.serving.api import APIService, LocalBackend, create_app
from lmforge.serving.config import build_serve_config
from lmforge.serving.model_server import ModelServer

KEY = "sk-fuzz-admin"
MODEL = "tiny-model"  # conftest's model directory name: the served model id
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "ignored_auth",
)
FUZZ_CONFIG = {
    "auth": {"openapi": {"HTTPBearer": {"bearer": KEY}}},
    "checks": {"enabled": False} | {name: {"enabled": True} for name in CHECKS},
    "phases": {"stateful": {"enabled": False}},
    # often send the served model id, so requests get past the 404 and generate (streams included)
    "dictionaries": {"served-model": {"values": [MODEL]}},
    "parameters": {
        "body.model": {"dictionary": "served-model", "probability": 0.7},
        "model_id": {"dictionary": "served-model", "probability": 0.5},
    },
}


def _config(model, keys_file=None):
    keys = {"api_keys_file": str(keys_file), "admin_api_keys_file": str(keys_file)} if keys_file else {}
    return build_serve_config(
        {"model": str(model), "registry_poll_s": 0, "engine": {"num_slots": 4, "max_queue": 8}} | keys
    )


# The document depends on the routes only, so it is read at import, from an app with no model (the
# schemathesis pytest plugin needs the schema at collection); the requests go to the real app.
schema = schemathesis.openapi.from_asgi(
    "/openapi.json",
    create_app(APIService(_config("unused"), {})),
    config=schemathesis.Config.from_dict(FUZZ_CONFIG),
)


@pytest.fixture(scope="module")
def app(model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("fuzz-keys") / "keys"
    keys.write_text(KEY + "\n")
    cfg = _config(model_dir, keys)
    server = ModelServer(cfg)
    yield create_app(APIService(cfg, {"a": LocalBackend(server)}))
    server.close()


@pytest.mark.integration
@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_no_undocumented_response(case, app):
    case.call_and_validate(app=app)


# Random bodies seldom get as far as generating, and never both endpoints' every answer shape, so
# these are checked explicitly against the document, by the same checks.
ANSWERS = [
    ("/v1/completions", {"prompt": "The quick", "max_tokens": 5, "logprobs": 2, "n": 2}),
    (
        "/v1/completions",
        {
            "prompt": "The quick",
            "max_tokens": 5,
            "logprobs": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    ("/v1/completions", {"prompt": "The quick", "max_tokens": 0, "echo": True, "logprobs": 1}),
    ("/v1/completions", {"prompt": ["The", "quick"], "max_tokens": 3, "echo": True, "stream": True}),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "n": 2,
            "stream": True,
            "logprobs": True,
            "stream_options": {"include_usage": True},
        },
    ),
]


@pytest.mark.parametrize("path, body", ANSWERS)
def test_every_answer_shape_matches_the_document(app, path, body):
    case = schema[path]["POST"].Case(body={"model": MODEL} | body, headers={"Authorization": f"Bearer {KEY}"})
    response = case.call_and_validate(app=app)
    assert response.status_code == 200, response.text
    expected = "text/event-stream" if body.get("stream") else "application/json"
    assert response.headers["content-type"][0].startswith(expected)
