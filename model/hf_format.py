"""Translation between lmforge's ModelConfig and a Hugging Face Llama `config.json`.

The weights need no translation (parameter names already match `LlamaForCausalLM`); only the
config's field names differ. Importing refuses any Hugging Face field value lmforge cannot
represent exactly, naming the field, rather than loading a model that silently computes something
else.
"""

from __future__ import annotations

from typing import Any

from lmforge.model.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama",)


class UnsupportedArchitecture(ConfigError):
    """A Hugging Face config uses a feature lmforge's model does not implement."""


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` transformers writes for an equivalent LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta/rope_scaling, >= 5 reads rope_parameters: write both.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
        "dtype": dtype,  # transformers >= 5
        "torch_dtype": dtype,  # transformers < 5
    }


def _first_token_id(value: Any, field: str) -> int | None:
    """HF allows a list of eos ids; lmforge keeps the first as *the* eos id (generation config keeps all)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return value[0]
    raise UnsupportedArchitecture(f"config.json field {field}={value!r} is not a token id or list of ids")


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise UnsupportedArchitecture(
                f"config.json field rope_parameters.rope_type={kind!r} is not supported "
                "(only plain RoPE, 'default')"
            )
        if "rope_theta" in params:
            return float(params["rope_theta"])
    if scaling not in (None, {}):
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise UnsupportedArchitecture(
                f"config.json field rope_scaling={scaling!r} is not supported (only plain RoPE)"
            )
    return float(hf.get("rope_theta", 10000.0))


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig for a Hugging Face Llama config, or UnsupportedArchitecture naming the field."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"config.json field model_type={model_type!r} is not supported; "
            f"lmforge loads {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitecture(
            f"config.json field hidden_act={act!r} is not supported (SwiGLU uses 'silu')"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            raise UnsupportedArchitecture(
                f"config.json field {flag}=true is not supported (lmforge projections have no bias)"
            )
    if float(hf.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise UnsupportedArchitecture(
            "config.json field attention_dropout must be 0 (lmforge does not use dropout)"
        )
    if hf.get("sliding_window") not in (None, 0):
        raise UnsupportedArchitecture(
            f"config.json field sliding_window={hf['sliding_window']!r} is not supported"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [name for name in required if name not in hf]
    if missing:
        raise UnsupportedArchitecture(f"config.json lacks required field(s): {', '.join(missing)}")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            d_ff=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=_rope_theta(hf),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
            bos_token_id=_first_token_id(hf.get("bos_token_id"), "bos_token_id"),
            eos_token_id=_first_token_id(hf.get("eos_token_id"), "eos_token_id"),
            pad_token_id=_first_token_id(hf.get("pad_token_id"), "pad_token_id"),
        )
    except ConfigError as err:
        raise UnsupportedArchitecture(f"config.json describes an invalid model: {err}") from err
