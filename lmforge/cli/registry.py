"""`lmforge registry`: list registered models, promote a version to an alias, roll an alias back.

lmforge registry list [NAME] [--json]
lmforge registry promote NAME VERSION --alias champion [--force] [--reason TEXT]
lmforge registry rollback NAME --alias champion

The registry is MLflow's ($MLFLOW_TRACKING_URI, default ./.lmforge/mlflow.db; or --tracking-uri).
A version whose evaluation gate failed (tag gate=failed) is not promoted without --force; a forced
promotion is recorded on the version. Serving deployments following models:/NAME@ALIAS pick the
new version up at their next poll.
"""

from __future__ import annotations

import argparse
import json
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "registry",
        help="list registered models, promote a version, roll an alias back",
        description="The MLflow model registry: versions with aliases, gate results, metrics and lineage; "
        "gated promotion (champion/challenger aliases) and rollback.",
    )
    uri_help = "MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else ./.lmforge/mlflow.db)"
    parser.add_argument("--tracking-uri", metavar="URI", help=uri_help)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="registered models, versions, aliases, gate, metrics, lineage")
    ls.add_argument("name", nargs="?", metavar="NAME", help="only this registered model")
    ls.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of a table")
    ls.add_argument("--tracking-uri", metavar="URI", default=argparse.SUPPRESS, help=uri_help)
    ls.set_defaults(func=run_list)

    promote = sub.add_parser("promote", help="point an alias at a version (refused if its gate failed)")
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("version", metavar="VERSION")
    promote.add_argument("--alias", default="champion", help="alias to move (default champion)")
    promote.add_argument(
        "--force", action="store_true", help="promote even if the version failed its gate (recorded)"
    )
    promote.add_argument("--reason", default="", help="why (recorded with a forced promotion)")
    promote.add_argument("--tracking-uri", metavar="URI", default=argparse.SUPPRESS, help=uri_help)
    promote.set_defaults(func=run_promote)

    rollback = sub.add_parser("rollback", help="move an alias back to the version that held it before")
    rollback.add_argument("name", metavar="NAME")
    rollback.add_argument("--alias", default="champion", help="alias to move back (default champion)")
    rollback.add_argument("--tracking-uri", metavar="URI", default=argparse.SUPPRESS, help=uri_help)
    rollback.set_defaults(func=run_rollback)


def _client(args: argparse.Namespace):
    from lmforge.registry import RegistryClient

    client = RegistryClient(args.tracking_uri)
    client.require_store()
    return client


def run_list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    models = _client(args).list_models(args.name)
    if args.json:
        print(json.dumps([asdict(m) for m in models], indent=2))
        return 0
    if not models:
        print("no registered models")
        return 0
    for model in models:
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(model.aliases.items())) or "none"
        print(f"{model.name}  (aliases: {aliases})")
        rows = [("VERSION", "ALIASES", "GATE", "CREATED", "METRICS", "LINEAGE")]
        for v in reversed(model.versions):
            metrics = ", ".join(f"{k}={val}" for k, val in sorted(v.metrics.items())[:3])
            if len(v.metrics) > 3:
                metrics += f" (+{len(v.metrics) - 3})"
            lineage = ", ".join(f"{k}={val[:12]}" for k, val in v.lineage.items())
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.created / 1000)) if v.created else "-"
            rows.append(
                (
                    v.version,
                    ",".join(v.aliases) or "-",
                    v.gate or "-",
                    created,
                    metrics or "-",
                    lineage or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for row in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)) + "  " + row[5])
    return 0


def run_promote(args: argparse.Namespace) -> int:
    move = _client(args).promote(args.name, args.version, args.alias, force=args.force, reason=args.reason)
    was = f" (was version {move.previous})" if move.previous else ""
    print(f"{move.uri} -> version {move.version}{was}")
    if move.forced:
        print(f"forced: version {move.version} failed its evaluation gate; recorded on the version")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    move = _client(args).rollback(args.name, args.alias)
    print(f"{move.uri} rolled back: version {move.previous} -> version {move.version}")
    return 0
