"""`lmforge tokenize`: a curated dataset -> flat token shards + index.json for training."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.components.tokenize_shards import DEFAULT_BATCH_DOCS, DEFAULT_SHARD_TOKENS

    p = sub.add_parser(
        "tokenize",
        help="encode a curated dataset into token shards for training",
        description=(
            "Encode every split of a curated dataset (<data>/<split>/*.jsonl) with a trained tokenizer "
            "(tokenizer.json + tokenizer_config.json naming eos_token), append the eos id after each "
            "document, and write flat uint16 (uint32 for vocabularies over 65,536) token shards plus "
            "index.json (token counts, dtype, vocab size, eos id, tokenizer SHA-256)."
        ),
        epilog="example: lmforge tokenize --data out/data --tokenizer out/tokenizer --output out/tokens",
    )
    p.add_argument(
        "--data", required=True, metavar="DIR", help="curated dataset folder (output of `lmforge curate`)"
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help="tokenizer folder (output of `lmforge tokenizer train`)",
    )
    p.add_argument(
        "--output", required=True, metavar="DIR", help="folder to write <split>-NNNNN.bin and index.json into"
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS:,})",
    )
    p.add_argument(
        "--batch-docs",
        type=int,
        default=DEFAULT_BATCH_DOCS,
        metavar="N",
        help=f"documents per encode_batch call (default: {DEFAULT_BATCH_DOCS})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace token shards already in --output")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_tokenize)


def _tokenize(args: argparse.Namespace) -> int:
    from lmforge.components.tokenize_shards import tokenize_dataset

    result = tokenize_dataset(
        args.data,
        args.tokenizer,
        args.output,
        shard_tokens=args.shard_tokens,
        batch_docs=args.batch_docs,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    splits = ", ".join(f"{s} {n:,} tokens / {result.documents[s]:,} docs" for s, n in result.tokens.items())
    Console(soft_wrap=True).print(
        f"[green]tokenized[/green] {splits} -> {escape(str(result.index_path))} ({result.dtype}, "
        f"vocab {result.vocab_size:,}, eos id {result.eos_id})"
    )
    return 0
