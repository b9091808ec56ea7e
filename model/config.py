"""Model architecture configuration and the preset registry.

One dataclass describes the decoder-only transformer. Field names are lmforge's own; the mapping to
Hugging Face `LlamaConfig` names lives in `model/hf_format.py`, so a saved model directory is a
Hugging Face Llama checkpoint. Every derived field is filled in and every contradiction rejected in
`__post_init__`, with the offending field named, so a bad config fails before any tensor exists.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the reason."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 512  # hidden size
    n_layers: int = 8
    n_heads: int = 8  # query heads
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int | None = None  # SwiGLU hidden size; None = 8/3 * d_model rounded up to `ff_multiple_of`
    ff_multiple_of: int = 256
    max_seq_len: int = 1024  # context length (RoPE tables and KV caches are sized by it)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # share the input embedding with the output projection
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ff_multiple_of")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must be a positive divisor of "
                f"model.n_heads={self.n_heads} (each key/value head serves a whole group of query heads)"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0:
                raise ConfigError(
                    f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                    "change one of them or set model.head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim <= 0 or self.head_dim % 2 != 0:
            raise ConfigError(
                f"model.head_dim={self.head_dim} must be a positive even number (RoPE rotates pairs)"
            )
        if self.d_ff is None:
            hidden = int(8 * self.d_model / 3)
            self.d_ff = self.ff_multiple_of * math.ceil(hidden / self.ff_multiple_of)
        if self.d_ff <= 0:
            raise ConfigError(f"model.d_ff must be positive, got {self.d_ff}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        if not 0 < self.norm_eps < 1:
            raise ConfigError(f"model.norm_eps must be in (0, 1), got {self.norm_eps}")
        if not self.init_std > 0:
            raise ConfigError(f"model.init_std must be > 0, got {self.init_std}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"model.{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    # ---- derived figures -------------------------------------------------------------------
    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count (tied embeddings counted once)."""
        assert self.n_kv_heads is not None and self.head_dim is not None and self.d_ff is not None
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.d_model * self.d_ff
        norms = 2 * self.d_model
        per_layer = attn + mlp + norms
        total = self.n_layers * per_layer + self.d_model  # + final norm
        if include_embeddings:
            total += self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        elif not self.tie_embeddings:
            total += self.vocab_size * self.d_model  # the output projection is a real matmul
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6*N (N without the input embedding) + 12*L*d*T attention."""
        seq = seq_len or self.max_seq_len
        return 6 * self.num_params(include_embeddings=False) + 12 * self.n_layers * self.d_model * seq

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset by name, with optional field overrides (e.g. vocab_size from a tokenizer)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        values = dataclasses.asdict(PRESETS[name].config)
        # derived fields are recomputed from the overrides unless given explicitly
        for derived in ("n_kv_heads", "head_dim", "d_ff"):
            if derived not in PRESETS[name].explicit:
                values[derived] = None
        values.update(overrides)
        return cls.from_dict(values)


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    source: str  # where the numbers come from
    explicit: frozenset[str] = field(default_factory=frozenset)


def _preset(source: str, **values: Any) -> Preset:
    return Preset(ModelConfig(**values), source, frozenset(values))


PRESETS: dict[str, Preset] = {
    "tiny": _preset(
        "CPU-sized debug model for tests (~0.2M parameters); "
        "numbers chosen to exercise GQA and untied paths cheaply",
        vocab_size=1024,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=176,
        max_seq_len=256,
    ),
    "small": _preset(
        "CPU demo model (~30M parameters with a 16k vocabulary): a scaled-down Llama shape, GQA 8:4",
        vocab_size=16384,
        d_model=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=4,
        d_ff=1408,
        max_seq_len=1024,
    ),
    "seed-1.3b": _preset(
        "The product brief's reference model: 24 layers, d_model 2048, 16 heads, 2048 context, ~50k vocab "
        "(50304 = 50k rounded to a multiple of 128); SwiGLU 5632 = 8/3*2048 rounded to 256; "
        "~1.34B parameters",
        vocab_size=50304,
        d_model=2048,
        n_layers=24,
        n_heads=16,
        n_kv_heads=16,
        d_ff=5632,
        max_seq_len=2048,
        rope_theta=10000.0,
    ),
}
