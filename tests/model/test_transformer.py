"""The transformer's own properties: causality, KV-cache equivalence, checkpointing, compile."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer, apply_activation_checkpointing, cross_entropy_loss


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny")).eval()


def test_logits_shape_and_causality(tiny):
    x = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        logits = tiny(x)
        changed = x.clone()
        changed[:, 10:] = (changed[:, 10:] + 1) % 1024
        logits_changed = tiny(changed)
    assert logits.shape == (2, 16, 1024)
    torch.testing.assert_close(logits[:, :10], logits_changed[:, :10])  # the future never leaks back
    assert not torch.allclose(logits[:, 10:], logits_changed[:, 10:])


def test_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=256, n_layers=8, n_heads=4, max_seq_len=32)
    model = Transformer(cfg)
    q_std = model.model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = model.model.layers[0].self_attn.o_proj.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2 * 8 layers)
    assert torch.equal(model.model.norm.weight, torch.ones(256))


@pytest.mark.parametrize("per_row", [False, True])
def test_kv_cache_decoding_equals_full_recomputation(tiny, per_row):
    x = torch.randint(0, 1024, (2, 24))
    cache = KVCache.for_model(tiny, batch_size=2, max_len=64)
    with torch.no_grad():
        full = tiny(x)
        pos = torch.arange(10)
        steps = [tiny(x[:, :10], positions=pos.expand(2, 10) if per_row else pos, kv_cache=cache)]
        for t in range(10, 24):
            pos = torch.tensor([t])
            steps.append(
                tiny(x[:, t : t + 1], positions=pos.expand(2, 1) if per_row else pos, kv_cache=cache)
            )
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_rows_at_different_lengths(tiny):
    """Two sequences of different lengths decode side by side, each equal to running it alone."""
    a, b = torch.randint(0, 1024, (1, 12)), torch.randint(0, 1024, (1, 7))
    with torch.no_grad():
        full_a, full_b = tiny(a), tiny(b)
        cache = KVCache.for_model(tiny, batch_size=2, max_len=32)
        padded = torch.zeros(2, 12, dtype=torch.long)
        padded[0], padded[1, :7] = a[0], b[0]
        logits = tiny(padded, positions=torch.arange(12).expand(2, 12), kv_cache=cache)
        torch.testing.assert_close(logits[0], full_a[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1, :7], full_b[0], atol=1e-5, rtol=1e-5)
        # next step: row 0 at position 12, row 1 at position 7 (overwrites the padding's cache slot)
        nxt = torch.randint(0, 1024, (2, 1))
        step = tiny(nxt, positions=torch.tensor([[12], [7]]), kv_cache=cache)
        ref_a = tiny(torch.cat([a, nxt[:1]], dim=1))[:, -1]
        ref_b = tiny(torch.cat([b, nxt[1:]], dim=1))[:, -1]
    torch.testing.assert_close(step[0, 0], ref_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], ref_b[0], atol=1e-5, rtol=1e-5)


def test_active_len_limits_attention_without_changing_results(tiny):
    x = torch.randint(0, 1024, (1, 8))
    with torch.no_grad():
        full = tiny(x)
        cache = KVCache.for_model(tiny, batch_size=1)
        cache.active_len = 8
        out = tiny(x, positions=torch.arange(8), kv_cache=cache)
    assert cache.k[0, :, :, :8].abs().sum() > 0
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


def test_errors_are_clear(tiny):
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        tiny(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="explicit token positions"):
        tiny(torch.zeros(1, 4, dtype=torch.long), kv_cache=KVCache.for_model(tiny, 1))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        KVCache.for_model(tiny, 1, max_len=1000)


def _grads(model, x):
    model.zero_grad()
    loss = cross_entropy_loss(model(x[:, :-1]), x[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_loss_and_grads():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny"))
    x = torch.randint(0, 1024, (2, 33))
    loss_ref, grads_ref = _grads(model, x)
    names_before = list(model.state_dict())
    apply_activation_checkpointing(model)
    assert list(model.state_dict()) == names_before  # parameter names unchanged (HF layout kept)
    loss, grads = _grads(model, x)
    torch.testing.assert_close(loss, loss_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_activation_checkpointing_under_torch_compile():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny"))
    x = torch.randint(0, 1024, (2, 33))
    loss_ref, grads_ref = _grads(model, x)
    compiled = torch.compile(apply_activation_checkpointing(model))
    model.zero_grad()
    loss = cross_entropy_loss(compiled(x[:, :-1]), x[:, 1:])
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss_ref, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name], atol=1e-5, rtol=1e-4)


def test_bf16_forward_runs_and_rope_tables_stay_fp32():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny")).to(torch.bfloat16)
    assert model.rotary.cos.dtype == torch.float32
    logits = model(torch.randint(0, 1024, (1, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_last_only_returns_the_last_positions_logits(tiny):
    x = torch.randint(0, 1024, (2, 12))
    with torch.no_grad():
        full = tiny(x)
        last = tiny(x, last_only=True)
    assert last.shape == (2, 1, 1024)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_decode_attention_equals_sdpa_with_a_mask(kv_heads):
    """The reduction form used by compiled CPU decode steps is the same math as masked SDPA."""
    from lmforge.model.transformer import decode_attention

    torch.manual_seed(0)
    B, H, S, D = 3, 4, 11, 16
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, kv_heads, S, D), torch.randn(B, kv_heads, S, D)
    lengths = torch.tensor([11, 5, 1])  # each row sees a different prefix of the cache
    mask = (torch.arange(S) < lengths.unsqueeze(1)).view(B, 1, 1, S)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != H)
    torch.testing.assert_close(decode_attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)


def test_swiglu_same_values_and_gradients_as_the_plain_expression():
    from lmforge.model.transformer import swiglu

    torch.manual_seed(0)
    gate = (torch.randn(6, 40, dtype=torch.float64) * 4).requires_grad_()  # large |gate| too
    up = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(swiglu, (gate, up))
    out = swiglu(gate, up)
    torch.testing.assert_close(out, F.silu(gate) * up)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (gate, up), grad)
    want = torch.autograd.grad(F.silu(gate) * up, (gate, up), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    # what autograd keeps: gate and up only (silu(gate) is recomputed in backward)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(gate, up)
    assert len(saved) == 2
    # bf16 (autocast on a GPU): gradients as close to fp32's as torch's own bf16 silu backward gets
    g16, u16 = gate.detach().bfloat16().requires_grad_(), up.detach().bfloat16().requires_grad_()
    ours = torch.autograd.grad(swiglu(g16, u16), (g16, u16), grad.bfloat16())
    g16b, u16b = gate.detach().bfloat16().requires_grad_(), up.detach().bfloat16().requires_grad_()
    theirs = torch.autograd.grad(F.silu(g16b) * u16b, (g16b, u16b), grad.bfloat16())
    for a, b, exact in zip(ours, theirs, want, strict=True):
        assert a.dtype == torch.bfloat16
        assert (a.double() - exact).abs().max() <= 1.5 * (b.double() - exact).abs().max() + 1e-2
