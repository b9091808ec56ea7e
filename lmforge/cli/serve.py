"""`lmforge serve`: serve a model over an OpenAI-compatible HTTP API with Ray Serve."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from lmforge.cli._args import add_config_args
from lmforge.errors import UserError

DRAIN_TIMEOUT_S = 30.0  # = lmforge.serving.app.DRAIN_TIMEOUT_S (not imported: --help stays fast)
# a replica's lmforge log line at WARNING or above (serving/app.py's replica log format)
_LMFORGE_WARNING = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) lmforge[.:]")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (Ray Serve)",
        description=(
            "Start Ray Serve (locally, or on the Ray cluster in RAY_ADDRESS) and serve a model directory or "
            "a registered model (models:/NAME@ALIAS, which follows alias moves) through the "
            "continuous-batching engine: /v1/completions, /v1/chat/completions, /v1/models, /health, /ready, "
            "/metrics. The model is checked before Ray starts. API keys come from $LMFORGE_API_KEYS "
            "(comma-separated) or api_keys_file; without keys the server only runs open on a loopback "
            "address, unless --allow-unauthenticated. SIGTERM or Ctrl-C lets requests in flight finish "
            "(--drain-timeout), then stops Serve and Ray; a second one stops at once. Ray's and the "
            "replicas' logs go to a log file (--verbose: also to the console)."
        ),
        epilog=(
            "examples:\n"
            "  lmforge serve --model out/model\n"
            "  LMFORGE_API_KEYS=sk-1,sk-2 lmforge serve --model models:/support-bot@champion --host 0.0.0.0\n"
            "  lmforge serve --model out/model --adapter support=out/ft-support/adapter \\\n"
            '      --adapter legal=out/ft-legal/adapter   # a request sends "model": "model:support"\n'
            "  lmforge serve --config serve.yaml --set engine.num_slots=16 \\\n"
            "      --write-serve-config serve_config.yaml"
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
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve a PEFT LoRA adapter (a directory or models:/NAME@ALIAS) on top of the model; requests "
        'select it with "model": '
        '"BASE:NAME" (repeatable; adds to the config\'s adapters; checked against the model before Ray '
        "starts)",
    )
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
        help="write the Ray Serve config YAML (serve run / KubeRay serveConfigV2) for these settings; exit",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DRAIN_TIMEOUT_S,
        metavar="SECONDS",
        help="on SIGTERM / Ctrl-C, let requests in flight finish for up to this long before stopping "
        f"(default {DRAIN_TIMEOUT_S:.0f}; keep it below the pod's terminationGracePeriodSeconds)",
    )
    p.add_argument(
        "--log-file",
        metavar="FILE",
        help="where Ray's and the replicas' logs go (default .lmforge/logs/serve-DATE-TIME.log)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="also print Ray's and the replicas' logs on the console"
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from lmforge.ray_logs import RayLogs, default_log_file
    from lmforge.serving.adapters import parse_adapter_args
    from lmforge.serving.app import DeploymentError, check_models, run_server, serve_config_yaml
    from lmforge.serving.auth import Authenticator
    from lmforge.serving.config import load_serve_config

    if not args.drain_timeout >= 0:
        raise UserError(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout}")

    cfg = load_serve_config(
        args.config,
        args.overrides,
        model=args.model,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        allow_unauthenticated=args.allow_unauthenticated,
        adapters=parse_adapter_args(args.adapter),
    )
    if args.write_serve_config:
        with open(args.write_serve_config, "w", encoding="utf-8") as fh:
            fh.write(serve_config_yaml(cfg))
        print(
            f"wrote the Ray Serve config to {args.write_serve_config} (serve run {args.write_serve_config})"
        )
        return 0
    auth = Authenticator.from_config(cfg)  # the secure default, checked before anything starts
    warnings = check_models(cfg)  # the model exists: one line now, not replica tracebacks later
    said = auth.describe(cfg.host)
    print(said, file=sys.stderr if auth.open_access else sys.stdout)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    log_file = Path(args.log_file) if args.log_file else default_log_file("serve")

    def show(line: str) -> bool:
        """Replica lines for the console: lmforge's warnings and errors (not the auth notice again)."""
        return bool(_LMFORGE_WARNING.match(line)) and said not in line

    def ready() -> None:
        print(
            f"serving {cfg.model_id!r} ({cfg.model}) at {url}/v1 - OpenAI-compatible; Ctrl-C to stop",
            flush=True,
        )
        if cfg.adapters:
            ids = ", ".join(f"{cfg.model_id}:{name}" for name in cfg.adapters)
            print(f"adapters: {ids} (at most {cfg.max_adapters_per_replica} loaded per replica)", flush=True)

    for warning in warnings:
        print(f"lmforge serve: warning: {warning}", file=sys.stderr)
    print(f"starting Ray Serve for {cfg.model} (Ray's logs: {log_file}) ...", flush=True)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("lmforge serve: %(message)s"))
    logger = logging.getLogger("lmforge")
    logger.addHandler(console)
    logger.setLevel(logging.INFO)
    try:
        run_server(
            cfg,
            on_ready=ready,
            drain_timeout_s=args.drain_timeout,
            logs=RayLogs(log_file, verbose=args.verbose, show=show),
            preflight=False,
        )
    except DeploymentError as err:
        print(f"lmforge serve: error: {err} (details: {log_file})", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(console)
    print("lmforge serve: stopped", flush=True)
    return 0
