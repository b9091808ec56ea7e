"""The int8 decode fast path (model/int8_gemv.py) and the tied embedding looked up in a quantized head.

The kernel is built once per machine (~1 min with g++, cached under TORCH_EXTENSIONS_DIR); where it
cannot be built (no compiler, not x86-64 with AVX2) the kernel tests skip and the fallback tests
still run."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmforge.components.quantize.stage import quantize
from lmforge.model import int8_gemv
from lmforge.model.checkpoint import load_model_dir, save_model_dir
from lmforge.model.config import ModelConfig
from lmforge.model.decode_layout import apply_decode_layout
from lmforge.model.generation import SamplingParams, generate
from lmforge.model.quantized import QuantizedEmbedding, QuantizedLinear, share_tied_embedding, tensor_bytes
from lmforge.model.transformer import Transformer

needs_kernel = pytest.mark.skipif(
    int8_gemv._cpu_supported() is not None,
    reason=f"int8 kernel cannot run here: {int8_gemv._cpu_supported()}",
)
VOCAB = 300


@pytest.fixture
def kernel_decision():
    """Restore the process-wide availability decision after a test that forces it."""
    yield
    int8_gemv._reset_for_tests()


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    """A tied-embedding model with large random weights (so greedy decoding does not repeat one token)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=72,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=136,
        max_seq_len=64,
        tie_embeddings=True,
    )  # d_model 72, d_ff 136: K not a multiple of 32 (kernel tails)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("kernel") / "fp32"
    save_model_dir(model, out)
    return out


@pytest.fixture(scope="module")
def quantized_dirs(tied_model_dir):
    return {
        m: quantize(tied_model_dir, tied_model_dir.parent / m, method=m, group_size=8).output_dir
        for m in ("int8", "int4")
    }


@needs_kernel
@pytest.mark.parametrize(
    "rows,k,n", [(1, 1, 1), (1, 7, 3), (1, 37, 5), (2, 100, 33), (3, 577, 17), (8, 64, 9)]
)
def test_kernel_matches_the_dequantized_reference_on_odd_shapes(rows, k, n):
    assert int8_gemv.available()
    torch.manual_seed(k + n)
    x = torch.randn(rows, k)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) * 0.01 + 1e-4
    stored = torch.zeros(n, k + 3, dtype=torch.uint8)  # padded rows, as int32 packing leaves them
    stored[:, :k] = (q.to(torch.int16) + 128).to(torch.uint8)
    y = int8_gemv.int8_gemv(x, stored, scale)
    reference = (x.double() @ q.double().t()) * scale.double()
    assert y.shape == (rows, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_quantized_linear_uses_the_kernel_for_decode_rows_only():
    torch.manual_seed(1)
    w = torch.randn(40, 52)
    scale = w.abs().amax(1, keepdim=True) / 127
    layer = QuantizedLinear.from_quantized(torch.round(w / scale).to(torch.int8), scale, None, 8, None)
    reference = layer.dequantize()
    assert int8_gemv.available()
    for shape in [(1, 52), (1, 1, 52), (3, 52), (2, 4, 52), (2, 9, 52)]:  # 18 rows: the dequantize path
        x = torch.randn(*shape)
        with torch.profiler.profile() as prof:
            y = layer(x)
        used = any(e.key == "lmforge::int8_gemv" for e in prof.key_averages())
        assert used == (x.numel() // 52 <= int8_gemv.MAX_ROWS)
        torch.testing.assert_close(y, x @ reference.t(), rtol=1e-4, atol=1e-4)
    x = torch.randn(1, 52, requires_grad=True)  # QLoRA: gradients flow through the dequantize path
    layer(x).sum().backward()
    assert x.grad is not None


@needs_kernel
def test_engine_greedy_output_with_the_kernel_equals_the_dequantize_path(quantized_dirs, kernel_decision):
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    prompt = [5, 17, 42, 7]
    model = apply_decode_layout(load_model_dir(quantized_dirs["int8"]))
    assert int8_gemv.decided_available()
    with torch.profiler.profile() as prof:
        fast = generate(model, prompt, params).token_ids
    assert any(e.key == "lmforge::int8_gemv" for e in prof.key_averages())
    int8_gemv._reset_for_tests(ok=False, why="test")
    slow = generate(load_model_dir(quantized_dirs["int8"]), prompt, params).token_ids
    assert fast == slow
    assert len(set(fast)) > 2  # a real continuation, not one repeated token


@needs_kernel
@pytest.mark.slow  # torch.compile of the decode step: ~30-60 s on 2 cores
def test_compiled_engine_calls_the_kernel_without_graph_breaks(quantized_dirs, kernel_decision):
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    prompt = [5, 17, 42, 7]
    model = load_model_dir(quantized_dirs["int8"])
    eager = generate(apply_decode_layout(model), prompt, params).token_ids
    torch._dynamo.reset()
    with torch.profiler.profile() as prof:  # compile=True: fullgraph, so a graph break would raise
        compiled = generate(load_model_dir(quantized_dirs["int8"]), prompt, params, compile=True).token_ids
    assert any(e.key == "lmforge::int8_gemv" for e in prof.key_averages())
    assert compiled == eager


def test_fallback_is_announced_once_and_stays_correct(monkeypatch, kernel_decision):
    int8_gemv._reset_for_tests()
    monkeypatch.setattr(int8_gemv.platform, "machine", lambda: "aarch64")
    with pytest.warns(RuntimeWarning, match="int8 GEMV kernel unavailable .*aarch64"):
        assert not int8_gemv.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second question is answered silently
        assert not int8_gemv.available()
    assert "aarch64" in (int8_gemv.unavailable_reason() or "")
    torch.manual_seed(2)
    w = torch.randn(16, 24)
    scale = w.abs().amax(1, keepdim=True) / 127
    layer = QuantizedLinear.from_quantized(torch.round(w / scale).to(torch.int8), scale, None, 8, None)
    x = torch.randn(1, 24)
    with torch.profiler.profile() as prof:
        y = layer(x)
    assert not any(e.key == "lmforge::int8_gemv" for e in prof.key_averages())
    torch.testing.assert_close(y, x @ layer.dequantize().t(), rtol=1e-4, atol=1e-4)


def test_the_switch_turns_the_kernel_off(monkeypatch, kernel_decision):
    int8_gemv._reset_for_tests()
    monkeypatch.setenv("LMFORGE_INT8_KERNEL", "0")
    with pytest.warns(RuntimeWarning, match="LMFORGE_INT8_KERNEL=0"):
        assert not int8_gemv.available()


@pytest.mark.parametrize("method,atol", [("int8", 0.02), ("int4", 0.3)])
def test_tied_embedding_is_looked_up_in_the_quantized_head(quantized_dirs, tied_model_dir, method, atol):
    """int8/int4 RTN head; int4 (group 8, asymmetric) exercises the packed zero points."""
    model = load_model_dir(quantized_dirs[method])
    assert model.head_tied_to_embedding
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        before = model(ids)
        held_before = tensor_bytes(model)
        head_rows = model.lm_head.dequantize()[ids]  # what the embedding now returns
    share_tied_embedding(model)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert "model.embed_tokens.weight" not in model.state_dict()
    embedding_bytes = VOCAB * 72 * 4
    assert tensor_bytes(model) == held_before - embedding_bytes  # the fp32 copy is gone
    reference = load_model_dir(quantized_dirs[method])  # the same model with a dequantized-head table
    with torch.no_grad():
        reference.model.embed_tokens.weight.copy_(reference.lm_head.dequantize())
        torch.testing.assert_close(model.model.embed_tokens(ids), head_rows, rtol=0, atol=1e-6)
        after = model(ids)
        torch.testing.assert_close(after, reference(ids), rtol=1e-5, atol=1e-5)
        original = load_model_dir(tied_model_dir)(ids)
    # the embedding now carries the head's quantization error: still close to the original
    assert (after - original).abs().max() < 4 * max(atol, float((before - original).abs().max()))
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    assert len(generate(model, [1, 2, 3], params).token_ids) == 5


def test_untied_or_unquantized_models_are_left_alone(tied_model_dir, tmp_path):
    fp32 = load_model_dir(tied_model_dir)
    assert share_tied_embedding(fp32).model.embed_tokens.__class__ is torch.nn.Embedding
    kept = quantize(tied_model_dir, tmp_path / "keep", method="int8", keep_embeddings=True).output_dir
    model = load_model_dir(kept)
    assert not model.head_tied_to_embedding
    assert isinstance(share_tied_embedding(model).model.embed_tokens, torch.nn.Embedding)
