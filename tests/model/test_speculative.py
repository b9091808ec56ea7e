"""Speculative decoding: greedy output equals the target's own greedy output, and the accept/reject
rule leaves the target's sampling distribution unchanged."""

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.generation import SamplingParams, SamplingParamsError, generate
from lmforge.model.speculative import accept_or_resample, speculative_generate
from lmforge.model.transformer import Transformer


def tiny(seed: int, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_name("tiny", init_std=0.2, tie_embeddings=False, **overrides)).eval()


@pytest.fixture(scope="module")
def target():
    return tiny(0)


@pytest.fixture(scope="module")
def draft():
    return tiny(1, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("prompt", [[1, 2, 3, 4, 5], [42]])
def test_greedy_equals_target_greedy(target, draft, prompt, k):
    params = SamplingParams(max_new_tokens=13, temperature=0)
    out = speculative_generate(target, draft, prompt, params, num_draft_tokens=k)
    assert out.token_ids == generate(target, prompt, params).token_ids
    assert out.finish_reason == "length"
    assert out.target_forwards <= 13


def test_a_perfect_draft_is_always_accepted(target):
    params = SamplingParams(max_new_tokens=16, temperature=0)
    out = speculative_generate(target, target, [3, 1, 4], params, num_draft_tokens=4)
    assert out.token_ids == generate(target, [3, 1, 4], params).token_ids
    assert out.acceptance_rate == 1.0
    assert out.target_forwards == 4  # 5 tokens per target pass (4 accepted + 1 bonus): 5 + 5 + 5 + 1


def test_stop_token_ends_early(target, draft):
    free = generate(target, [1, 2, 3], SamplingParams(max_new_tokens=12, temperature=0)).token_ids
    stop = free[5]
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop,))
    out = speculative_generate(target, draft, [1, 2, 3], params, num_draft_tokens=4)
    assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"


def test_accept_or_resample_preserves_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.1, 0.1])  # a poor draft, even proposing an impossible token
    n = 200_000
    proposals = torch.multinomial(q, n, replacement=True, generator=gen)
    accepted, tokens = accept_or_resample(p.expand(n, -1), q.expand(n, -1), proposals, gen)
    empirical = torch.bincount(tokens, minlength=6).float() / n
    assert torch.allclose(empirical, p, atol=0.006), empirical
    # acceptance probability is sum_x min(p, q) = 0.1 + 0.1 + 0.15 + 0.1 + 0.05 + 0 = 0.5
    assert accepted.float().mean().item() == pytest.approx(0.5, abs=0.006)
    same = accept_or_resample(
        p.expand(1000, -1), p.expand(1000, -1), torch.multinomial(p, 1000, True, generator=gen), gen
    )[0]
    assert same.all()  # a draft equal to the target is always accepted


def test_sampling_is_seeded_and_valid(target, draft):
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, seed=9)
    a = speculative_generate(target, draft, [1, 2], params, num_draft_tokens=3)
    b = speculative_generate(target, draft, [1, 2], params, num_draft_tokens=3)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    assert 0 <= a.acceptance_rate <= 1 and a.proposed > 0


def test_refuses_what_it_cannot_do(target, draft):
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, tiny(2, vocab_size=512), [1], SamplingParams(max_new_tokens=2))
    with pytest.raises(SamplingParamsError, match="n > 1"):
        speculative_generate(target, draft, [1], SamplingParams(max_new_tokens=2, n=2))
    with pytest.raises(SamplingParamsError, match="exceeds the context"):
        speculative_generate(target, draft, [1] * 250, SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="num_draft_tokens"):
        speculative_generate(target, draft, [1], SamplingParams(max_new_tokens=2), num_draft_tokens=0)
