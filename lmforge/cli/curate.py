"""`lmforge curate`: raw documents -> clean, deduplicated, PII-redacted dataset + datacard."""

from __future__ import annotations

import argparse
import dataclasses

from rich.console import Console
from rich.markup import escape

from lmforge.cli._args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curate",
        help="clean, filter, deduplicate and redact raw documents into a training dataset",
        description=(
            "Read folders/files (.txt .md .rst .html .jsonl, each optionally .gz) and s3://bucket/prefix "
            "URIs (endpoint and credentials from the config's s3 section or LMFORGE_S3_ENDPOINT, "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); normalize the text, apply quality filters, remove "
            "exact and near duplicates, redact PII, split train/validation/test by a stable hash of each "
            "document id, and write JSONL shards with datacard.json and datacard.md. Every input document "
            "is kept or counted under exactly one rejection reason."
        ),
        epilog="example: lmforge curate --input data/sample --exclude 'LICENSE*' --exclude SOURCES.md "
        "--output out/data --config configs/curate.yaml --set filters.min_words=50 --set num_workers=2",
    )
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="local files/folders or s3://bucket/prefix URIs (repeatable)",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder to write <split>/part-*.jsonl and the datacards into",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out files matching this pattern: without '/' it matches a file name at any depth "
        "('LICENSE*'), with '/' the path inside the input ('howto/*'); added to the config's input.exclude "
        "(repeatable)",
    )
    add_config_args(
        p,
        example="dedup.jaccard_threshold=0.7",
        config_help="YAML config (default: built-in defaults, as in configs/curate.yaml)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_curate)


def _curate(args: argparse.Namespace) -> int:
    from lmforge.components.curate import CurateConfig, curate
    from lmforge.config import load

    cfg = load(CurateConfig, args.config, args.overrides)
    if args.exclude:  # replace() re-runs the section's checks on the added patterns
        cfg.input = dataclasses.replace(cfg.input, exclude=[*cfg.input.exclude, *args.exclude])
    result = curate(args.input, args.output, cfg, overwrite=args.overwrite, progress=not args.no_progress)
    m, card = result.metrics(), result.datacard
    console = Console(soft_wrap=True)
    console.print(
        f"[green]curated[/green] {m['documents_in']:,} documents ({m['bytes_in']:,} bytes) -> "
        f"kept {m['documents_kept']:,} ({m['bytes_out']:,} bytes): train {m['train_documents']:,}, "
        f"validation {m['validation_documents']:,}, test {m['test_documents']:,}"
    )
    rejected = {r: v["documents"] for r, v in card["rejections"].items() if v["documents"]}
    if rejected:
        console.print("rejected: " + ", ".join(f"{r} {n:,}" for r, n in rejected.items()))
    pii = {t: n for t, n in card["pii_replacements"].items() if n}
    if pii:
        console.print("PII replaced: " + ", ".join(f"{t} {n:,}" for t, n in pii.items()))
    excluded = card["sources"].get("excluded_files", 0)
    if excluded:
        console.print(f"excluded: {excluded:,} files matching input.exclude {escape(str(cfg.input.exclude))}")
    console.print(f"datacard: {escape(str(result.datacard_md_path))}")
    return 0
