"""The decoding weight layout changes speed only: same values, names, ties, outputs."""

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.decode_layout import MatvecLinear, PackedHeadLinear, apply_decode_layout
from lmforge.model.generation import SamplingParams, generate_batch
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer

GREEDY = SamplingParams(max_new_tokens=10, temperature=0)


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    # vocab 8192 makes the output head big enough to get the packed multi-row path
    return Transformer(ModelConfig.from_name("tiny", init_std=0.2, vocab_size=8192, **overrides)).eval()


def test_layout_keeps_values_names_ties_and_outputs():
    model = tiny()
    prompts = [[1, 2, 3], [9, 8], [4, 5, 6, 7]]
    before = [o.token_ids for o in generate_batch(model, prompts, GREEDY)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_decode_layout(model)
    assert not model.model.layers[0].mlp.gate_proj.weight.is_contiguous()  # wide: column-major
    assert model.model.layers[0].mlp.down_proj.weight.is_contiguous()  # narrow: row-major
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [o.token_ids for o in generate_batch(model, prompts, GREEDY)] == before  # batched: packed head


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built into this torch")
def test_packed_head_matches_and_follows_weight_changes():
    model = apply_decode_layout(tiny(tie_embeddings=False))
    head = model.lm_head
    assert isinstance(head, PackedHeadLinear)
    x = torch.randn(5, 1, 64)
    with torch.inference_mode():
        torch.testing.assert_close(head(x), x @ head.weight.T, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        head.weight.mul_(2.0)  # e.g. merging an adapter: the packed copy must not go stale
    with torch.inference_mode():
        torch.testing.assert_close(head(x), x @ head.weight.T, atol=1e-4, rtol=1e-4)
    y = head(x.requires_grad_())  # with autograd on, the plain path runs (gradients flow)
    y.sum().backward()
    assert head.weight.grad is not None


def test_layout_model_still_decodes_with_a_cache():
    model = tiny()
    reference = model(torch.tensor([[1, 2, 3, 4]]))[0, -1]
    apply_decode_layout(model)
    cache = KVCache.for_model(model, 2, 16)
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3, 4]] * 2), torch.arange(4), cache)[:, -1]
    torch.testing.assert_close(logits[0], reference.detach(), atol=1e-4, rtol=1e-4)


def test_for_compile_layout_is_row_major_and_reversible():
    model = apply_decode_layout(tiny())
    assert not model.model.layers[0].mlp.up_proj.weight.is_contiguous()
    apply_decode_layout(model, for_compile=True)
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert isinstance(model.model.layers[0].self_attn.q_proj, MatvecLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_decode_layout(model)  # and back to the eager GEMV layout
    assert not model.model.layers[0].mlp.up_proj.weight.is_contiguous()


@pytest.mark.slow  # one small torch.compile (~10 s on CPU)
def test_matvec_linear_compiled_single_row_equals_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=True)
    layer.__class__ = MatvecLinear
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        for shape in ((1, 1, 48), (1, 48), (3, 48)):  # one row: the reduction; several: the GEMM
            x = torch.randn(shape)
            torch.testing.assert_close(
                compiled(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5
            )
