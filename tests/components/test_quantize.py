"""`lmforge quantize`: int8/int4 round trip in the compressed-tensors layout, transformers interop,
the engine and the CLI on quantized directories, the calibrated methods, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.components.quantize.calibration import CalibrationError
from lmforge.components.quantize.gptq import gptq_quantize
from lmforge.components.quantize.methods import Scheme, dequantize, rtn
from lmforge.components.quantize.stage import AlreadyQuantizedError, quantize
from lmforge.errors import ConfigError, InputNotFoundError
from lmforge.model.checkpoint import load_model_dir, save_model_dir
from lmforge.model.config import ModelConfig
from lmforge.model.quantized import QuantizedLinear, quantization_scheme, quantized_modules
from lmforge.model.transformer import Transformer

VOCAB = 400  # the session test tokenizer's


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64
    )
    out = tmp_path_factory.mktemp("quant") / "fp32"
    save_model_dir(Transformer(cfg).eval(), out, tokenizer_dir=tokenizer_dir)
    return out


@pytest.fixture(scope="module")
def quantized(model_dir):
    """{method: QuantizeResult} for the two plain methods."""
    return {
        method: quantize(model_dir, model_dir.parent / method, method=method, group_size=32)
        for method in ("int8", "int4")
    }


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    from tests.conftest import TOKENIZER_TEXTS

    path = tmp_path_factory.mktemp("calib") / "part-00000.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TOKENIZER_TEXTS * 4))
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("method,atol", [("int8", 0.02), ("int4", 0.3)])
def test_quantized_directory_loads_and_stays_close_to_the_original(model_dir, quantized, method, atol):
    result = quantized[method]
    assert quantization_scheme(result.output_dir)["format"] == "pack-quantized"
    assert json.loads((result.output_dir / "report.json").read_text())["method"] == method
    original, q = load_model_dir(model_dir), load_model_dir(result.output_dir)
    assert len(quantized_modules(q)) == 2 * 7 + 1  # every projection and the output head
    ids = torch.randint(0, VOCAB, (2, 16))
    a, b = _logits(original, ids), _logits(q, ids)
    assert (a - b).abs().max() < atol
    assert (a - b).abs().max() > 0  # it really is quantized
    report = result.report
    limit = {"int8": 0.30, "int4": 0.18}[method]
    assert report["linear_ratio"] <= limit, report  # measured tensor bytes of the quantized layers
    assert report["bytes_after"] < report["bytes_before"]
    assert (result.output_dir / "tokenizer.json").is_file()


def test_int4_layout_is_packed_two_values_per_byte(quantized):
    from safetensors import safe_open

    with safe_open(str(quantized["int4"].output_dir / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        shape = f.get_tensor("model.layers.0.mlp.down_proj.weight_shape").tolist()
        zp = f.get_tensor("model.layers.0.mlp.down_proj.weight_zero_point")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        assert "model.layers.0.mlp.down_proj.weight" not in f.keys()
    assert shape == [64, 128] and packed.dtype == torch.int32
    assert packed.numel() * 4 == 64 * 128 // 2
    assert scale.shape == (64, 128 // 32) and zp.shape == (64 // 8, 128 // 32)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_transformers_loads_the_directory_with_the_same_logits(quantized, method):
    from transformers import AutoModelForCausalLM

    from lmforge.components.quantize.layout import patch_transformers_loading

    patch_transformers_loading()  # compressed-tensors 0.20 bug with packed zero points (layout.py)
    out = quantized[method].output_dir
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, _logits(load_model_dir(out), ids), rtol=1e-4, atol=1e-4)


def test_engine_generates_from_a_quantized_directory(quantized):
    from lmforge.model.generation import SamplingParams, generate

    model = load_model_dir(quantized["int4"].output_dir)
    prompt = [5, 17, 42, 7]
    out = generate(model, prompt, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    ids = list(prompt)  # the same greedy continuation from full forwards, no KV cache
    for _ in range(6):
        ids.append(int(_logits(model, torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[len(prompt) :]


def test_quantize_error_bounds_per_scheme():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    for scheme in (Scheme.for_method("int8", 64), Scheme.for_method("int4", 32)):
        q, scale, zp = rtn(w, scheme)
        err = (dequantize(q, scale, zp, scheme) - w).abs()
        # round to nearest: at most half a step, per group
        step = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
        assert (err <= step / 2 + 1e-6).all()
        assert q.min() >= scheme.qmin and q.max() <= scheme.qmax


def test_gptq_has_lower_output_error_than_round_to_nearest():
    """On correlated inputs (what real activations are), GPTQ's compensated weights reproduce the
    layer's outputs better than plain rounding at the same bits."""
    torch.manual_seed(0)
    mix = torch.randn(64, 64) * (torch.rand(64) * 3)
    x = torch.randn(512, 64) @ mix  # correlated input channels
    w = torch.randn(48, 64) * 0.05
    scheme = Scheme.for_method("int4", 32)
    q_r, s_r, z_r = rtn(w, scheme)
    q_g, s_g, z_g = gptq_quantize(w, 2 * x.t() @ x / x.shape[0], scheme)
    err_rtn = (x @ w.t() - x @ dequantize(q_r, s_r, z_r, scheme).t()).pow(2).mean()
    err_gptq = (x @ w.t() - x @ dequantize(q_g, s_g, z_g, scheme).t()).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_gptq_act_order_keeps_static_groups_and_beats_column_order():
    """act_order visits high-energy input channels first; its groups stay contiguous (the scales are
    the round-to-nearest group parameters of the original weights, so the on-disk layout is
    unchanged), every value is in range, and the layer's output error is lower than plain GPTQ's on
    inputs whose channel energies differ widely."""
    torch.manual_seed(0)
    x = torch.randn(1024, 128) @ (torch.randn(128, 128) * 0.3) * torch.linspace(0.05, 4.0, 128)
    w = torch.randn(64, 128) * 0.05
    scheme = Scheme.for_method("int4", 32)
    h = 2 * x.t() @ x / x.shape[0]
    q_a, s_a, z_a = gptq_quantize(w, h, scheme, act_order=True)
    q_c, s_c, z_c = gptq_quantize(w, h, scheme, act_order=False)
    _, s_r, z_r = rtn(w, scheme)
    assert torch.equal(s_a, s_r) and torch.equal(z_a, z_r)
    assert q_a.shape == w.shape and q_a.min() >= scheme.qmin and q_a.max() <= scheme.qmax

    def out_err(q, s, z):
        return (x @ w.t() - x @ dequantize(q, s, z, scheme).t()).pow(2).mean()

    assert out_err(q_a, s_a, z_a) < out_err(q_c, s_c, z_c)


@pytest.mark.parametrize("method", ["int4-gptq", "int4-awq"])
def test_calibrated_methods_write_loadable_models(model_dir, calibration_file, method, tmp_path):
    result = quantize(
        model_dir,
        tmp_path / method,
        method=method,
        group_size=32,
        calibration=calibration_file,
        num_sequences=16,
        seq_len=16,
        min_sequences=8,
    )
    r = result.report
    assert r["calibration_sequences"] >= 8
    assert r["calibration_loss_after"] == pytest.approx(r["calibration_loss_before"], rel=0.05)
    q = load_model_dir(result.output_dir)
    assert all(isinstance(m, QuantizedLinear) for m in quantized_modules(q).values())


def test_bad_input_gets_clear_errors(model_dir, quantized, calibration_file, tmp_path):
    with pytest.raises(ConfigError, match="method='int3' is unknown"):
        quantize(model_dir, tmp_path / "x", method="int3")
    with pytest.raises(ConfigError, match="group_size=48 does not divide the input dimension 64"):
        quantize(model_dir, tmp_path / "x", method="int4", group_size=48)
    with pytest.raises(AlreadyQuantizedError, match="already quantized"):
        quantize(quantized["int8"].output_dir, tmp_path / "x", method="int4")
    with pytest.raises(CalibrationError, match="pass --calibration"):
        quantize(model_dir, tmp_path / "x", method="int4-awq")
    with pytest.raises(CalibrationError, match="at least 500 are needed"):
        quantize(
            model_dir, tmp_path / "x", method="int4-gptq", calibration=calibration_file, min_sequences=500
        )
    with pytest.raises(InputNotFoundError):
        quantize(model_dir, tmp_path / "x", method="int4-awq", calibration=tmp_path / "nothing")
    with pytest.raises(InputNotFoundError, match="not a model directory"):
        quantize(tmp_path / "missing", tmp_path / "x", method="int8")
    assert not (tmp_path / "x").exists()


def test_cli_quantizes_and_reports_user_errors_in_one_line(model_dir, tmp_path, capsys):
    from lmforge.cli.entrypoint import main

    out = tmp_path / "cli-int8"
    assert main(["quantize", "--model", str(model_dir), "--output", str(out), "--method", "int8"]) == 0
    assert "quantized" in capsys.readouterr().out
    assert quantization_scheme(out) is not None
    code = main(["quantize", "--model", str(model_dir), "--output", str(out), "--method", "fp3"])
    assert code == 2
    assert "method='fp3' is unknown" in capsys.readouterr().err
    bad = ["--method", "int4-gptq", "--set", "gptq_act_order=yes"]
    code = main(["quantize", "--model", str(model_dir), "--output", str(tmp_path / "g"), *bad])
    assert code == 2
    assert "gptq_act_order='yes': must be 1" in capsys.readouterr().err


def test_generate_cli_runs_a_quantized_directory(quantized, capsys):
    """`lmforge generate` loads through the same path as `lmforge serve` (serving/textgen.py)."""
    from lmforge.cli.entrypoint import main

    out = str(quantized["int4"].output_dir)
    args = [
        "generate",
        "--model",
        out,
        "--prompt",
        "The quick",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.strip()
