"""`lmforge tokenizer train`: train a byte-level BPE tokenizer on a corpus and report its fertility."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape


def register(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser(
        "tokenizer",
        help="train a tokenizer on your corpus",
        description="Tokenizer commands. `lmforge tokenizer train --help` for details.",
    )
    actions = tok.add_subparsers(dest="tokenizer_action", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train",
        help="train a byte-level BPE tokenizer and write it in the Hugging Face format",
        description=(
            "Train a byte-level BPE tokenizer (every byte is a token, so no text is ever unknown) and write "
            "tokenizer.json, tokenizer_config.json (special tokens, ChatML chat template) and "
            "special_tokens_map.json, which transformers' AutoTokenizer loads unchanged. A fraction of the "
            "documents is held out (stable hash of each document's id) and fertility.json/fertility.md "
            "report tokens per word and bytes per token on it, next to reference tokenizers."
        ),
        epilog=(
            "example: lmforge tokenizer train --input data/sample/python-docs --output out/tokenizer "
            "--vocab-size 8192"
        ),
    )
    train.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help='files or directories (read recursively): .txt .md .rst .html .jsonl (a "text" field per line), '
        "each optionally .gz",
    )
    train.add_argument("--output", required=True, metavar="DIR", help="directory to write the tokenizer into")
    train.add_argument(
        "--vocab-size",
        type=int,
        default=16384,
        metavar="N",
        help="total ids incl. 256 byte tokens and the special tokens (default: 16384)",
    )
    train.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        metavar="N",
        help="merge only pairs seen at least N times (default: 2)",
    )
    train.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="share of documents kept out of training for the fertility report (default: 0.1)",
    )
    train.add_argument(
        "--model-max-length",
        type=int,
        default=2048,
        metavar="N",
        help="context length recorded in tokenizer_config.json (default: 2048)",
    )
    refs = train.add_mutually_exclusive_group()
    refs.add_argument(
        "--reference",
        nargs="+",
        metavar="DIR",
        help="tokenizer directories (with tokenizer.json) to compare with "
        "(default: the bundled SmolLM2 tokenizer, when present)",
    )
    refs.add_argument("--no-reference", action="store_true", help="compare with no reference tokenizer")
    train.add_argument("--progress", action="store_true", help="show the trainer's progress bars")
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from lmforge.components.tokenizer import train_tokenizer

    console = Console(soft_wrap=True)  # keep the markdown table on one line per row
    console.print(f"training a byte-level BPE tokenizer on {', '.join(args.input)} ...", markup=False)
    result = train_tokenizer(
        args.input,
        args.output,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        holdout_fraction=args.holdout_fraction,
        reference_tokenizers=[] if args.no_reference else args.reference,
        model_max_length=args.model_max_length,
        show_progress=args.progress,
    )
    c = result.corpus
    console.print(
        f"[green]trained[/green] {escape(str(result.output_dir))}: vocab size {result.vocab_size:,} "
        f"(requested {result.requested_vocab_size:,}) in {result.train_seconds:.1f} s on "
        f"{c.train_documents:,} documents ({c.train_bytes:,} bytes); {c.heldout_documents:,} held out"
    )
    console.print(result.fertility_md.read_text(encoding="utf-8"), markup=False, highlight=False)
    return 0
