"""ONNX export: one export of a tiny GQA model with an untied head (through the CLI), then onnxruntime
against PyTorch (prefill with an empty past, decode steps, other batch sizes), greedy generation through
onnxruntime against the lmforge engine's, the metadata, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _compress_data import one_thread

from lmforge.cli import main as cli_main
from lmforge.components.onnx_export import OnnxDecoderSession, export_onnx
from lmforge.errors import ConfigError, UserError
from lmforge.model import ModelConfig, Transformer, load_model_dir
from lmforge.model.checkpoint import save_model_dir
from lmforge.model.generation import SamplingParams, generate

# one torch.onnx.export (torch.export + onnxscript) takes ~20-80 s on the shared 2-core machine
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path]:
    """(model dir, export dir)."""
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=400, n_layers=2, tie_embeddings=False, eos_token_id=1)
    model = Transformer(cfg)
    with torch.no_grad():  # larger logits than at init, so greedy choices are not near-ties
        model.lm_head.weight.mul_(20.0)
    save_model_dir(model, root / "model", tokenizer_dir=tokenizer_dir)
    with one_thread():
        assert cli_main(["export-onnx", "--model", str(root / "model"), "--output", str(root / "onnx")]) == 0
    return root / "model", root / "onnx"


def test_export_layout_and_parity_metadata(exported) -> None:
    import onnx

    _, out = exported
    for name in ("model.onnx", "config.json", "generation_config.json", "tokenizer.json", "onnx_export.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "onnx_export.json").read_text())
    assert meta["format"] == "lmforge-onnx/1" and meta["opset"] >= 18
    assert meta["parity"]["max_abs_diff"] <= 1e-4
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input][:3] == [
        "input_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    assert [o.name for o in proto.graph.output][:2] == ["logits", "present.0.key"]


@pytest.mark.parametrize("batch, prompt", [(1, 1), (3, 5)])
def test_onnxruntime_matches_pytorch_prefill_and_decode(exported, batch: int, prompt: int) -> None:
    model_dir, out = exported
    model = load_model_dir(model_dir)
    session = OnnxDecoderSession(out / "model.onnx")
    ids = torch.randint(0, 400, (batch, prompt + 4), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        reference = model(ids).numpy()
    logits, past = session(ids[:, :prompt].numpy(), session.empty_past(batch))
    np.testing.assert_allclose(logits, reference[:, :prompt], atol=1e-4, rtol=0)
    for t in range(prompt, prompt + 4):
        logits, past = session(ids[:, t : t + 1].numpy(), past)
        np.testing.assert_allclose(logits[:, 0], reference[:, t], atol=1e-4, rtol=0)
    assert past[0].shape == (batch, 2, prompt + 4, 16)


def test_greedy_generation_through_onnxruntime_equals_the_engine(exported) -> None:
    model_dir, out = exported
    model = load_model_dir(model_dir)
    session = OnnxDecoderSession(out / "model.onnx")
    params = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    for prompt in ([0, 17, 33, 250], [0], list(range(5, 40))):
        engine_ids = generate(model, prompt, params).completions[0].token_ids
        assert session.greedy(prompt, max_new_tokens=20) == engine_ids
    stop_params = SamplingParams(temperature=0.0, max_new_tokens=30)  # stops at eos (id 1) if produced
    engine_ids = generate(model, [0, 9], stop_params).completions[0].token_ids
    assert session.greedy([0, 9], max_new_tokens=30, eos_token_id=1) == engine_ids


def test_bad_input(exported, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir, out = exported
    with pytest.raises(UserError, match="not empty"):
        export_onnx(model_dir, out)
    with pytest.raises(UserError, match="is the model directory"):
        export_onnx(model_dir, model_dir)
    with pytest.raises(ConfigError, match="opset must be an integer >= 18"):
        export_onnx(model_dir, tmp_path / "o", opset=17)
    assert cli_main(["export-onnx", "--model", str(tmp_path / "none"), "--output", str(tmp_path / "x")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "o").exists()
