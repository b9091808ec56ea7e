"""The fused output projection + cross-entropy equals the textbook computation, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.fused_loss import fused_linear_cross_entropy, release_workspaces
from lmforge.model.transformer import Transformer, cross_entropy_loss


def reference(hidden, weight, targets, ignore_index=-100):
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize(
    "workspace_bytes", [64 << 20, 100 * 4 * 7]
)  # one chunk; chunks of 7 tokens (ragged end)
def test_loss_and_gradients_match_reference(workspace_bytes):
    torch.manual_seed(0)
    h0, w0 = torch.randn(3, 20, 16), torch.randn(100, 16) * 0.3
    targets = torch.randint(0, 100, (3, 20))
    targets[0, :5] = -100  # padding positions are excluded from the mean
    h1, w1 = leaves(h0, w0)
    ref = reference(h1, w1, targets)
    ref.backward()
    h2, w2 = leaves(h0, w0)
    out = fused_linear_cross_entropy(h2, w2, targets, workspace_bytes=workspace_bytes)
    out.backward()
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)


def test_frozen_weight_gets_no_gradient_and_the_same_hidden_gradient():
    """A frozen head (LoRA / QLoRA fine-tuning): no weight gradient is formed, the hidden one is unchanged."""
    torch.manual_seed(0)
    h0, w0 = torch.randn(2, 9, 16), torch.randn(100, 16) * 0.3
    targets = torch.randint(0, 100, (2, 9))
    targets[1, 4:] = -100
    (h1,) = leaves(h0)
    reference(h1, w0, targets).backward()
    (h2,) = leaves(h0)
    weight = w0.clone()  # requires_grad False
    out = fused_linear_cross_entropy(h2, weight, targets, workspace_bytes=100 * 4 * 5)
    assert out.grad_fn is not None
    out.backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    assert weight.grad is None


def test_upstream_gradient_scales_both_gradients():
    torch.manual_seed(1)
    h0, w0 = torch.randn(8, 4), torch.randn(10, 4)
    targets = torch.randint(0, 10, (8,))
    h1, w1 = leaves(h0, w0)
    (reference(h1, w1, targets) * 0.25).backward()
    h2, w2 = leaves(h0, w0)
    (fused_linear_cross_entropy(h2, w2, targets) * 0.25).backward()  # e.g. loss / accumulation steps
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    h, w = leaves(torch.randn(5, 4), torch.randn(10, 4))
    loss = fused_linear_cross_entropy(h, w, torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0.0  # (F.cross_entropy would give NaN here)
    assert h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_without_grad_only_the_loss_is_computed():
    torch.manual_seed(2)
    h, w = torch.randn(6, 4), torch.randn(12, 4)
    targets = torch.randint(0, 12, (6,))
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, targets)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference(h, w, targets))


def test_second_backward_through_the_same_graph_is_refused():
    h, w = leaves(torch.randn(4, 4), torch.randn(6, 4))
    loss = fused_linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="token dimensions"):
        fused_linear_cross_entropy(
            torch.randn(2, 5, 4), torch.randn(10, 4), torch.zeros(2, 4, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="hidden size 4"):
        fused_linear_cross_entropy(torch.randn(2, 4), torch.randn(10, 3), torch.zeros(2, dtype=torch.long))


def test_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(3)
    h0, w0 = torch.randn(16, 32), torch.randn(64, 32) * 0.2
    targets = torch.randint(0, 64, (16,))
    h1, w1 = leaves(h0, w0)
    reference(h1, w1, targets).backward()
    h2, w2 = leaves(h0, w0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h2, w2, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and h2.grad.dtype == torch.float32 and w2.grad.dtype == torch.float32
    torch.testing.assert_close(loss, reference(h0, w0, targets), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("tied", [False, True])
def test_model_training_loss_equals_logits_path(tied):
    torch.manual_seed(4)
    model = Transformer(ModelConfig.from_name("tiny", tie_embeddings=tied))
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[1, -3:] = -100
    ref = cross_entropy_loss(model(x), y)
    ref.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = model(x, targets=y)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    release_workspaces()


def test_model_rejects_targets_with_decoding_options():
    model = Transformer(ModelConfig.from_name("tiny"))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="last_only"):
        model(ids, targets=ids, last_only=True)
    with pytest.raises(ValueError, match="shape of input_ids"):
        model(ids, targets=ids[:, :3])


def test_compiled_model_trains_through_the_fused_loss():
    torch.manual_seed(5)
    model = Transformer(ModelConfig.from_name("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    eager = model(ids[:, :-1], targets=ids[:, 1:])
    eager.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)  # the loss itself runs eagerly (a deliberate graph break)
    loss = compiled(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
