"""model/quantized.py: int4/int8 packing (bit-exact with compressed-tensors), QuantizedLinear, and
the save/load round trip of a quantized model directory."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.model.checkpoint import ModelDirError, load_model_dir, save_model_dir
from lmforge.model.config import ModelConfig
from lmforge.model.quantized import (
    QuantizedLinear,
    pack_int32,
    quantization_scheme,
    quantized_modules,
    tensor_bytes,
    unpack_int32,
)
from lmforge.model.transformer import Transformer


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(5, 64), (3, 40), (16, 8)])
def test_packing_round_trips_and_matches_compressed_tensors(bits, shape):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
    for dim in (0, 1):
        packed = pack_int32(q, bits, dim)
        assert packed.dtype == torch.int32
        assert torch.equal(packed, pack_to_int32(q, bits, packed_dim=dim))
        assert torch.equal(unpack_int32(packed, bits, shape, dim), q)
        assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=dim), q)
    if bits == 4 and shape[1] % 8 == 0:  # two values per byte
        assert pack_int32(q, 4).numel() * 4 == q.numel() // 2


def _random_quantized(bits=4, group_size=16, symmetric=False, out=24, inp=64):
    torch.manual_seed(0)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = 1 if group_size is None else inp // group_size
    q = torch.randint(lo, hi + 1, (out, inp), dtype=torch.int8)
    scale = torch.rand(out, groups) * 0.01 + 0.001
    zp = None if symmetric else torch.randint(lo, hi + 1, (out, groups), dtype=torch.int8)
    return QuantizedLinear.from_quantized(q, scale, zp, bits, group_size), q, scale, zp


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 16, False), (8, None, True), (4, 32, True)])
def test_dequantize_is_q_minus_zero_point_times_scale(bits, group_size, symmetric):
    layer, q, scale, zp = _random_quantized(bits, group_size, symmetric)
    gs = 64 if group_size is None else group_size
    expected = q.float().view(24, -1, gs)
    if zp is not None:
        expected = expected - zp.float().unsqueeze(-1)
    expected = (expected * scale.unsqueeze(-1)).view(24, 64)
    torch.testing.assert_close(layer.dequantize(), expected)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ expected.t())


def test_quantized_linear_is_frozen_and_differentiable_through_its_input():
    """What QLoRA needs: shape attributes, no trainable parameters, gradients to the input."""
    layer, *_ = _random_quantized()
    assert (layer.in_features, layer.out_features) == (64, 24)
    assert list(layer.parameters()) == []
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(2, 64))
    assert set(layer.state_dict()) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}


def _quantize_model_in_place(model, bits=4, group_size=16):
    """Round-to-nearest stand-in for the quantize stage (keeps this test torch-only)."""
    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": bits == 8,
                    "strategy": "channel" if group_size is None else "group",
                    "group_size": group_size,
                },
            }
        },
        "ignore": ["lm_head"],
    }
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = module.weight.detach()
            gs = w.shape[1] if group_size is None else group_size
            g = w.view(w.shape[0], -1, gs)
            if bits == 8:
                scale = g.abs().amax(-1) / 127.5
                q = torch.round(g / scale.unsqueeze(-1)).clamp(-128, 127).to(torch.int8).view_as(w)
                zp = None
            else:
                lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
                scale = (hi - lo) / 15
                zp = (-8 - torch.round(lo / scale)).clamp(-8, 7)
                q = (torch.round(g / scale.unsqueeze(-1)) + zp.unsqueeze(-1)).clamp(-8, 7).to(torch.int8)
                q, zp = q.view_as(w), zp.to(torch.int8)
            parent, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent),
                child,
                QuantizedLinear.from_quantized(q, scale, zp, bits, group_size),
            )
    model.quantization_config = qc
    return model


@pytest.mark.parametrize("bits,group_size", [(4, 16), (8, None)])
def test_quantized_model_directory_round_trip(tmp_path, bits, group_size):
    cfg = ModelConfig(
        vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=32
    )
    torch.manual_seed(0)
    float_model = Transformer(cfg).eval()
    model = _quantize_model_in_place(float_model, bits, group_size)
    save_model_dir(model, tmp_path / "q")
    assert quantization_scheme(tmp_path / "q")["format"] == "pack-quantized"
    assert quantization_scheme(tmp_path) is None
    loaded = load_model_dir(tmp_path / "q")
    assert len(quantized_modules(loaded)) == 2 * 7
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert tensor_bytes(loaded) == tensor_bytes(model)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_unsupported_scheme_is_refused_naming_the_field(tmp_path):
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=1, n_heads=4, d_ff=128, max_seq_len=32)
    model = _quantize_model_in_place(Transformer(cfg).eval(), 8, None)
    save_model_dir(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["format"] = "marlin-24"
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="quantization_config.format='marlin-24'"):
        load_model_dir(tmp_path / "q")
    config["quantization_config"]["format"] = "pack-quantized"
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 2
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="num_bits=2"):
        load_model_dir(tmp_path / "q")
