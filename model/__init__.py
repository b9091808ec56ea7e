"""lmforge's model package: a Llama-compatible decoder-only transformer in pure PyTorch.

Imports torch, safetensors and the standard library only (enforced by tests/model/test_imports.py):
no distributed setup, trackers, loggers or storage URIs live here.

The package init is lazy: `lmforge.model.config` (and so `ConfigError`, which every stage's errors derive
from) imports without torch, so processes that never touch tensors (curation workers) do not pay
for importing it.
"""

import importlib
from typing import Any

from lmforge.model.config import PRESETS, ConfigError, ModelConfig

_LAZY = {
    "load_model_dir": "lmforge.model.checkpoint",
    "save_model_dir": "lmforge.model.checkpoint",
    "KVCache": "lmforge.model.kv_cache",
    "Transformer": "lmforge.model.transformer",
    "apply_activation_checkpointing": "lmforge.model.transformer",
    "cross_entropy_loss": "lmforge.model.transformer",
    "fused_linear_cross_entropy": "lmforge.model.fused_loss",
}

__all__ = ["PRESETS", "ConfigError", "ModelConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge.model' has no attribute {name!r}")
