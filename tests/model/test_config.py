"""ModelConfig validation and the preset registry."""

import pytest

from lmforge.model.config import PRESETS, ConfigError, ModelConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_counts_params(name):
    cfg = ModelConfig.from_name(name)
    assert cfg.head_dim * cfg.n_heads > 0
    assert cfg.n_heads % cfg.n_kv_heads == 0
    assert PRESETS[name].source  # every preset says where its numbers come from


def test_preset_sizes_match_their_promises():
    assert ModelConfig.from_name("tiny").num_params() < 2_000_000
    assert 20_000_000 <= ModelConfig.from_name("small").num_params() <= 40_000_000
    seed = ModelConfig.from_name("seed-1.3b")
    assert (seed.n_layers, seed.d_model, seed.n_heads, seed.max_seq_len) == (24, 2048, 16, 2048)
    assert 49_000 <= seed.vocab_size <= 51_000
    assert 1.25e9 <= seed.num_params() <= 1.45e9


def test_num_params_matches_the_module():
    import torch

    from lmforge.model.transformer import Transformer

    for tie in (True, False):
        cfg = ModelConfig.from_name("tiny", tie_embeddings=tie)
        with torch.device("meta"):
            model = Transformer(cfg)
        assert model.num_params() == cfg.num_params()


def test_overrides_rederive_dependent_fields():
    cfg = ModelConfig.from_name("small", d_model=256, n_heads=4, n_kv_heads=2)
    assert cfg.head_dim == 64
    assert cfg.d_ff == 1408  # explicit in the preset, kept
    derived = ModelConfig(d_model=384, n_heads=6)
    assert derived.d_ff % 256 == 0 and derived.d_ff >= 8 * 384 / 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"d_model": 100, "n_heads": 3}, "d_model"),
        ({"n_heads": 8, "n_kv_heads": 3}, "n_kv_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"n_layers": -1}, "n_layers"),
        ({"d_model": 64, "n_heads": 4, "head_dim": 15}, "head_dim"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"vocab_size": 10, "eos_token_id": 10}, "eos_token_id"),
    ],
)
def test_bad_combinations_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kwargs)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        ModelConfig.from_name("huge")
    with pytest.raises(ConfigError, match="n_layer"):
        ModelConfig.from_dict({"n_layer": 2})
