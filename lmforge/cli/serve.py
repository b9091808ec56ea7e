"""`lmforge serve`: serve a model over an OpenAI-compatible HTTP API with Ray Serve."""

from __future__ import annotations

import argparse
import sys

from lmforge.cli._args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (Ray Serve)",
        description=(
            "Start Ray Serve (locally, or on the Ray cluster in RAY_ADDRESS) and serve a model directory or a "
            "registered model (models:/NAME@ALIAS, which follows alias moves) through the continuous-batching "
            "engine: /v1/completions, /v1/chat/completions, /v1/models, /health, /ready, /metrics. API keys come "
            "from $LMFORGE_API_KEYS (comma-separated) or api_keys_file; without keys the server only runs open on "
            "a loopback address, unless --allow-unauthenticated."
        ),
        epilog=(
            "examples:\n"
            "  lmforge serve --model out/model\n"
            "  LMFORGE_API_KEYS=sk-1,sk-2 lmforge serve --model models:/support-bot@champion --host 0.0.0.0\n"
            "  lmforge serve --config serve.yaml --set engine.num_slots=16 --write-serve-config serve_config.yaml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        metavar="DIR|models:/NAME@ALIAS",
        help="model directory or registry URI (required unless the config file names one)",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    add_config_args(p, example="engine.num_slots=16", config_help="YAML file with ServeConfig fields")
    p.add_argument("--served-model-name", help='the id clients send as "model" (default: the model\'s name)')
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=None,
        help="run without API keys on a non-loopback address (anyone who can reach it may use it)",
    )
    p.add_argument(
        "--write-serve-config",
        metavar="FILE",
        help="write the Ray Serve config YAML (serve run / KubeRay serveConfigV2) for these settings and exit",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from lmforge.serving.app import run_server, serve_config_yaml
    from lmforge.serving.auth import Authenticator
    from lmforge.serving.config import load_serve_config

    cfg = load_serve_config(
        args.config,
        args.overrides,
        model=args.model,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        allow_unauthenticated=args.allow_unauthenticated,
    )
    if args.write_serve_config:
        with open(args.write_serve_config, "w", encoding="utf-8") as fh:
            fh.write(serve_config_yaml(cfg))
        print(
            f"wrote the Ray Serve config to {args.write_serve_config} (serve run {args.write_serve_config})"
        )
        return 0
    auth = Authenticator.from_config(cfg)  # the secure default, checked before anything starts
    print(auth.describe(cfg.host), file=sys.stderr if auth.open_access else sys.stdout)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"

    def ready() -> None:
        print(
            f"serving {cfg.model_id!r} ({cfg.model}) at {url}/v1 - OpenAI-compatible; Ctrl-C to stop",
            flush=True,
        )

    print(f"starting Ray Serve for {cfg.model} ...", flush=True)
    run_server(cfg, on_ready=ready)
    return 0
