"""lmforge's model package: a Llama-compatible decoder-only transformer in pure PyTorch.

Imports torch, safetensors and the standard library only (enforced by tests/model/test_imports.py):
no distributed setup, trackers, loggers or storage URIs live here.
"""

from model.checkpoint import load_model_dir, save_model_dir
from model.config import PRESETS, ConfigError, ModelConfig
from model.kv_cache import KVCache
from model.transformer import Transformer, apply_activation_checkpointing, cross_entropy_loss

__all__ = [
    "PRESETS", "ConfigError", "KVCache", "ModelConfig", "Transformer", "apply_activation_checkpointing",
    "cross_entropy_loss", "load_model_dir", "save_model_dir",
]
