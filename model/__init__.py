"""lmforge's model package: a Llama-compatible decoder-only transformer in pure PyTorch.

Imports torch, safetensors and the standard library only (enforced by tests/model/test_imports.py):
no distributed setup, trackers, loggers or storage URIs live here.

The package init is lazy: `model.config` (and so `ConfigError`, which every stage's errors derive
from) imports without torch, so processes that never touch tensors (curation workers) do not pay
for importing it.
"""

import importlib

from model.config import PRESETS, ConfigError, ModelConfig

_LAZY = {
    "load_model_dir": "model.checkpoint",
    "save_model_dir": "model.checkpoint",
    "KVCache": "model.kv_cache",
    "Transformer": "model.transformer",
    "apply_activation_checkpointing": "model.transformer",
    "cross_entropy_loss": "model.transformer",
    "fused_linear_cross_entropy": "model.fused_loss",
}

__all__ = ["PRESETS", "ConfigError", "ModelConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
