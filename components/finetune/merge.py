"""`lmforge merge --base DIR --adapter DIR --output DIR`: fold a LoRA adapter into its base model.

The result is a plain model directory (Hugging Face Llama layout, fp32) whose outputs equal
base + adapter: peft's `merge_and_unload` adds scale * B @ A into each target weight. The tokenizer
files come from the adapter directory when it holds them (a fine-tuning run copies them there,
with the chat template it used), else from the base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lmforge.errors import InputNotFoundError, UserError
from lmforge.model.checkpoint import load_model_dir, save_model_dir


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write base + adapter, merged, to `output`; returns the model directory."""
    base, adapter = Path(base), Path(adapter)
    if not (base / "config.json").is_file():
        raise InputNotFoundError(f"--base {base}: not a model directory (config.json missing)")
    if not (adapter / "adapter_config.json").is_file():
        raise InputNotFoundError(f"--adapter {adapter}: not a PEFT adapter (adapter_config.json missing)")
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    if adapter_cfg.get("peft_type") != "LORA":
        raise UserError(f"--adapter {adapter}: peft_type {adapter_cfg.get('peft_type')!r}; only LORA merges")
    from peft import PeftModel

    model = load_model_dir(base, device="cpu", dtype=torch.float32)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (ValueError, RuntimeError, KeyError) as err:
        raise UserError(
            f"--adapter {adapter} does not fit --base {base}: {str(err).splitlines()[0]}"
        ) from None
    merged = peft_model.merge_and_unload()
    tokenizer = adapter if (adapter / "tokenizer.json").is_file() else base
    meta = {"merge": {"base": str(base.resolve()), "adapter": str(adapter.resolve())}}
    return save_model_dir(
        merged,
        output,
        tokenizer_dir=tokenizer if (tokenizer / "tokenizer.json").is_file() else None,
        extra_metadata=meta,
    )
