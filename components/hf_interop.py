"""Hugging Face interop stage: bring Llama-family checkpoints in, and hand lmforge models out.

An lmforge model directory already IS a Hugging Face Llama checkpoint (same parameter names, same
config.json fields), so neither direction converts weights. Import validates that the checkpoint
is one lmforge can represent exactly (refusing, with the field named, anything it cannot), that
the weights are safetensors and match the config, and that the tokenizer is a fast tokenizer whose
ids fit the embedding; export writes a clean directory for transformers / vLLM / llama.cpp's
converter. Both can change the stored precision.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import UserError
from lmforge.model.checkpoint import (
    dtype_from_name,
    load_model_dir,
    read_config,
    save_model_dir,
    weight_files,
)


@dataclass
class InteropResult:
    model_dir: Path
    num_params: int
    dtype: str
    tokenizer_files: list[str]


def _tokenizer_vocab_size(tokenizer_json: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)


def _check_tokenizer(src: Path, vocab_size: int, allow_missing: bool) -> bool:
    tok = src / "tokenizer.json"
    if not tok.is_file():
        if allow_missing:
            return False
        slow = [n for n in ("tokenizer.model", "vocab.json") if (src / n).is_file()]
        hint = (
            f" (found {', '.join(slow)}: convert it once with transformers' "
            "`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`, which writes tokenizer.json)"
            if slow
            else ""
        )
        raise UserError(
            f"{src} has no tokenizer.json{hint}; pass --allow-missing-tokenizer to import the weights alone"
        )
    tok_vocab = _tokenizer_vocab_size(tok)
    if tok_vocab > vocab_size:
        raise UserError(
            f"{tok} produces ids up to {tok_vocab - 1} but the model's vocab_size is {vocab_size}: "
            "the tokenizer does not belong to these weights"
        )
    return True


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_hf(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str | None = None,
    allow_missing_tokenizer: bool = False,
) -> InteropResult:
    """Validate a Hugging Face Llama checkpoint and write it as an lmforge model directory."""
    src = Path(input_dir)
    if not src.is_dir():
        raise UserError(f"--input {src} is not a directory")
    cfg = read_config(src)  # refuses architectures lmforge cannot represent, naming the field
    weight_files(src)  # refuses pickled-only checkpoints before reading anything
    has_tokenizer = _check_tokenizer(src, cfg.vocab_size, allow_missing_tokenizer)
    model = load_model_dir(src, dtype=dtype_from_name(dtype) if dtype else None)
    extra = (
        {"generation_config.json": src / "generation_config.json"}
        if (src / "generation_config.json").is_file()
        else {}
    )
    out = save_model_dir(
        model,
        output_dir,
        tokenizer_dir=src if has_tokenizer else None,
        extra_metadata={
            "imported_from": str(src.resolve()),
            "source_config_sha256": _sha256(src / "config.json"),
        },
        extra_files=extra,
    )
    return _result(out, model)


def export_hf(
    input_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype: str | None = None
) -> InteropResult:
    """Write an lmforge model directory as a plain Hugging Face checkpoint (no lmforge metadata)."""
    src = Path(input_dir)
    if not src.is_dir():
        raise UserError(f"--input {src} is not a directory")
    meta_path = src / "lmforge.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("quantization"):
        raise UserError(
            f"{src} is quantized ({meta['quantization'].get('scheme', '?')}); "
            "export the full-precision model instead"
        )
    model = load_model_dir(src, dtype=dtype_from_name(dtype) if dtype else None)
    has_tokenizer = (src / "tokenizer.json").is_file()
    out = save_model_dir(model, output_dir, tokenizer_dir=src if has_tokenizer else None)
    (out / "lmforge.json").unlink()
    _ensure_fast_tokenizer_class(out)
    return _result(out, model)


def _ensure_fast_tokenizer_class(model_dir: Path) -> None:
    """transformers' AutoTokenizer needs tokenizer_class to pick the fast tokenizer for tokenizer.json."""
    path = model_dir / "tokenizer_config.json"
    if (model_dir / "tokenizer.json").is_file():
        cfg = json.loads(path.read_text()) if path.is_file() else {}
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _result(out: Path, model: torch.nn.Module) -> InteropResult:
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    tokenizer_files = sorted(
        p.name for p in out.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "chat_template"))
    )
    return InteropResult(out, sum(p.numel() for p in model.parameters()), dtype, tokenizer_files)
