"""CUDA checks of the model package, run on a GPU machine (`benchmarks/gpu_session.sh`).

Skipped where no CUDA device exists (CI and the CPU development VM): these paths (bf16 on a GPU,
CUDA-graph decoding, fused AdamW on CUDA) cannot run there, and their CPU counterparts are tested
in the other files of this folder.
"""

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.engine import Engine
from lmforge.model.fused_loss import fused_linear_cross_entropy
from lmforge.model.generation import SamplingParams, generate
from lmforge.model.transformer import Transformer, cross_entropy_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


def tiny_on_cuda(dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", init_std=0.2)).to("cuda", dtype).eval()
    model.rotary.reset_tables("cuda")
    return model


def test_bf16_logits_close_to_fp32():
    fp32 = tiny_on_cuda()
    bf16 = tiny_on_cuda(torch.bfloat16)
    ids = torch.randint(0, fp32.config.vocab_size, (2, 32), device="cuda")
    with torch.inference_mode():
        a, b = fp32(ids), bf16(ids).float()
    assert bf16.rotary.cos.dtype == torch.float32  # RoPE tables stay fp32 after the cast
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


def test_kv_cache_decoding_equals_full_recomputation_on_cuda():
    model = tiny_on_cuda()
    prompt = [5, 9, 11, 2, 7]
    tokens = generate(model, prompt, GREEDY).token_ids
    ids = torch.tensor([prompt + tokens[:-1]], device="cuda")
    with torch.inference_mode():
        recomputed = model(ids)[0, len(prompt) - 1 :].argmax(-1).tolist()
    assert recomputed == tokens


@pytest.mark.slow
def test_cuda_graph_engine_matches_eager():
    model = tiny_on_cuda()
    prompt = [5, 9, 11, 2, 7]
    eager = generate(model, prompt, GREEDY).token_ids
    engine = Engine(model, num_slots=1, max_len=64, compile=True)
    for _ in range(2):  # the second run replays the recorded graph
        engine.submit(prompt, GREEDY)
        got = []
        while engine.has_work():
            got += [e.token_id for e in engine.step() if e.token_id is not None]
        assert got == eager


def test_bf16_autocast_training_step_reduces_loss():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny")).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (4, 65), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cross_entropy_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_fused_loss_matches_logits_path_under_bf16_autocast_on_cuda():
    torch.manual_seed(0)
    hidden = torch.randn(512, 256, device="cuda", requires_grad=True)
    weight = (torch.randn(4096, 256, device="cuda") * 0.05).requires_grad_()
    targets = torch.randint(0, 4096, (512,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = fused_linear_cross_entropy(
            hidden, weight, targets, workspace_bytes=4096 * 4 * 100
        )  # 6 chunks
        reference = cross_entropy_loss(torch.nn.functional.linear(hidden, weight)[None], targets[None])
    assert abs(fused.item() - reference.item()) < 2e-2
    fused.backward()
    assert hidden.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()
