"""`lmforge generate`: continue a prompt with a model directory and print the generated text.

lmforge generate --model out/model --prompt "Once upon a time" --max-new-tokens 64 --temperature 0
lmforge generate --model out/model --prompt-file q.txt --stream --verbose --stop "\\n\\n"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.cli._args import add_device_arg
from lmforge.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a model directory",
        description="Continue a prompt with a model directory (config.json + model.safetensors + "
        "tokenizer.json) and print the generated text.",
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="model directory (Hugging Face Llama layout)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    source.add_argument(
        "--prompt-file", metavar="FILE", type=Path, help="read the prompt from this UTF-8 file"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        metavar="N",
        help="tokens to generate at most (default 128)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        metavar="T",
        help="sampling temperature; 0 = greedy (default 0.8)",
    )
    parser.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="sample from the K most likely tokens; 0 = off"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass in (0, 1]; 1 = off"
    )
    parser.add_argument(
        "--min-p", type=float, default=0.0, metavar="P", help="drop tokens below P x the top probability"
    )
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0, metavar="R", help="> 1 discourages repeats; 1 = off"
    )
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this string (repeatable)"
    )
    parser.add_argument(
        "--num-beams", type=int, default=1, metavar="B", help="beam search with B beams (> 1)"
    )
    parser.add_argument(
        "--length-penalty", type=float, default=1.0, help="beam search length penalty (default 1.0)"
    )
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="seed for reproducible sampling")
    parser.add_argument(
        "--regex", metavar="PATTERN", help="constrain the output to match this regular expression"
    )
    parser.add_argument(
        "--draft-model", metavar="DIR", help="speculative decoding with this smaller model (same tokenizer)"
    )
    parser.add_argument(
        "--num-draft-tokens", type=int, default=4, metavar="K", help="draft tokens per speculative round"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (CUDA graphs on a GPU): slower start, faster tokens",
    )
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument(
        "--verbose", action="store_true", help="report tokens/s and time to first token on stderr"
    )
    add_device_arg(parser, default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weights dtype (default: as stored)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.devices import check_device
    from lmforge.model.checkpoint import dtype_from_name
    from lmforge.model.generation import SamplingParams
    from lmforge.serving.textgen import generate_from_dir

    if args.prompt_file is not None:
        try:
            prompt = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {err}") from err
    else:
        prompt = args.prompt
    if args.num_beams < 1:
        raise UserError(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.stream and args.num_beams > 1:
        raise UserError(
            "--stream cannot be combined with --num-beams > 1 "
            "(beam search knows the best text only at the end)"
        )
    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model} is not a directory")
    device = check_device(args.device)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = generate_from_dir(
        args.model,
        prompt,
        params,
        stop=args.stop,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        regex_pattern=args.regex,
        draft_model_dir=args.draft_model,
        num_draft_tokens=args.num_draft_tokens,
        device=str(device),
        dtype=dtype_from_name(args.dtype) if args.dtype else None,
        compile=args.compile,
        on_text=show if args.stream else None,
    )
    if not args.stream:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    if args.verbose:
        ttft = (
            f"{result.time_to_first_token_s * 1000:.1f} ms"
            if result.time_to_first_token_s is not None
            else "n/a"
        )
        rate = f"{result.decode_tokens_per_s:.1f} tokens/s" if result.decode_tokens_per_s else "n/a"
        print(
            f"prompt tokens: {result.prompt_tokens}  "
            f"generated: {len(result.token_ids)} ({result.finish_reason})  "
            f"time to first token: {ttft}  decode: {rate}  total: {result.elapsed_s:.2f} s",
            file=sys.stderr,
        )
    return 0
