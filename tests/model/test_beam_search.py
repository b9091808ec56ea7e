"""Beam search finds the known best sequence of a model whose probabilities we set by hand, and its
cache reordering agrees with scoring the chosen sequence on a real transformer."""

import itertools
import math

import pytest
import torch
from torch import nn

from lmforge.model.beam_search import BeamSearchParams, beam_search
from lmforge.model.config import ModelConfig
from lmforge.model.generation import SamplingParams, SamplingParamsError, generate, score
from lmforge.model.transformer import Transformer

A, B, C, EOS = 0, 1, 2, 3


class BigramLM(nn.Module):
    """A fake language model whose next-token distribution depends only on the last token.

    Same forward signature as Transformer (the KV cache is accepted and ignored), so generation
    code runs on it unchanged while the test knows every sequence's exact probability."""

    def __init__(self, probs: list[list[float]], eos: int | None = EOS) -> None:
        super().__init__()
        vocab = len(probs)
        self.config = ModelConfig(
            vocab_size=vocab, d_model=8, n_layers=1, n_heads=1, max_seq_len=64, eos_token_id=eos
        )
        self.logprobs = nn.Parameter(torch.tensor(probs).log(), requires_grad=False)

    def forward(self, input_ids, positions=None, kv_cache=None, attn_mask=None, last_only=False):
        return self.logprobs[input_ids]  # (B, T, V)


# After A: B is likeliest (0.5) but leads to a flat distribution; C (0.4) leads almost surely to eos.
PROBS = [
    [0.05, 0.50, 0.40, 0.05],  # after A
    [0.30, 0.30, 0.30, 0.10],  # after B
    [0.02, 0.02, 0.01, 0.95],  # after C
    [0.25, 0.25, 0.25, 0.25],  # after EOS (never used)
]


def brute_force_best(probs, prompt_last, max_new, length_penalty, eos=EOS):
    """Score every possible output (ended by eos, or cut at max_new) exactly."""
    logp = torch.tensor(probs).log()
    best = (-math.inf, None)
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(len(probs)), repeat=n):
            if eos in seq[:-1] or (n < max_new and seq[-1] != eos):
                continue
            total, last = 0.0, prompt_last
            for t in seq:
                total += float(logp[last, t])
                last = t
            s = total / n**length_penalty
            if s > best[0]:
                best = (s, seq)
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_finds_the_best_sequence_greedy_misses(length_penalty, early_stopping):
    model = BigramLM(PROBS)
    best_score, best_seq = brute_force_best(PROBS, A, max_new=4, length_penalty=length_penalty)
    greedy = generate(model, [A], SamplingParams(max_new_tokens=4, temperature=0)).token_ids
    assert tuple(greedy) != best_seq  # the problem really needs search
    params = BeamSearchParams(
        num_beams=3, max_new_tokens=4, length_penalty=length_penalty, early_stopping=early_stopping
    )
    top = beam_search(model, [A], params)[0]
    assert top.token_ids == best_seq == (C, EOS)
    assert top.score == pytest.approx(best_score) and top.finished


def test_length_penalty_changes_the_winner():
    # after A: eos at once (0.5) vs a long path A->B->B->B.. (0.4999 * 0.8^k)
    probs = [
        [0.0001, 0.4999, 0.0, 0.5],
        [0.0001, 0.8, 0.0, 0.1999],
        [0.25, 0.25, 0.25, 0.25],
        [0.25, 0.25, 0.25, 0.25],
    ]
    model = BigramLM(probs)
    for lp in (0.0, 2.0):
        best_score, best_seq = brute_force_best(probs, A, max_new=5, length_penalty=lp)
        top = beam_search(model, [A], BeamSearchParams(num_beams=4, max_new_tokens=5, length_penalty=lp))[0]
        assert top.token_ids == best_seq
        assert top.score == pytest.approx(best_score)
    short = beam_search(model, [A], BeamSearchParams(num_beams=4, max_new_tokens=5, length_penalty=0.0))[0]
    long = beam_search(model, [A], BeamSearchParams(num_beams=4, max_new_tokens=5, length_penalty=2.0))[0]
    assert len(short.token_ids) < len(long.token_ids)


def test_returns_several_hypotheses_best_first():
    model = BigramLM(PROBS)
    hyps = beam_search(model, [A], BeamSearchParams(num_beams=4, max_new_tokens=3, num_return_sequences=3))
    assert len(hyps) == 3 and len({h.token_ids for h in hyps}) == 3
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_diverse_groups_start_differently():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", init_std=0.2, tie_embeddings=False)).eval()
    plain = beam_search(
        model, [1, 2, 3], BeamSearchParams(num_beams=4, max_new_tokens=4, num_return_sequences=4)
    )
    diverse = beam_search(
        model,
        [1, 2, 3],
        BeamSearchParams(
            num_beams=4, max_new_tokens=4, num_return_sequences=4, num_beam_groups=4, diversity_penalty=100.0
        ),
    )
    # one beam per group, each group forced off the tokens earlier groups chose at each step
    assert len({h.token_ids[0] for h in diverse}) == 4
    assert len({h.token_ids[0] for h in plain}) < 4
    for h in diverse:  # reported scores stay true log-probabilities (the penalty only steers)
        assert h.logprob == pytest.approx(score(model, [1, 2, 3], list(h.token_ids)).logprob, abs=1e-4)


def test_cache_reordering_matches_the_models_scores():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", init_std=0.2, tie_embeddings=False)).eval()
    prompt = [5, 6, 7, 8]
    hyps = beam_search(
        model,
        prompt,
        BeamSearchParams(num_beams=5, max_new_tokens=8, num_return_sequences=5, length_penalty=0.0),
    )
    for h in hyps:
        assert h.logprob == pytest.approx(score(model, prompt, list(h.token_ids)).logprob, abs=1e-4)
    one = beam_search(model, prompt, BeamSearchParams(num_beams=1, max_new_tokens=8))[0]
    assert (
        list(one.token_ids)
        == generate(model, prompt, SamplingParams(max_new_tokens=8, temperature=0)).token_ids
    )
    assert hyps[0].logprob >= one.logprob - 1e-5


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": 4, "num_beam_groups": 3}, "num_beam_groups"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"num_beams": 2, "diversity_penalty": 1.0}, "diversity_penalty"),
        ({"length_penalty": math.inf}, "length_penalty"),
    ],
)
def test_invalid_beam_params(kwargs, field):
    with pytest.raises(SamplingParamsError, match=f"beam_search.{field} "):
        BeamSearchParams(**kwargs)


def test_beam_search_refuses_too_long_requests():
    with pytest.raises(SamplingParamsError, match="exceeds the context of 64"):
        beam_search(BigramLM(PROBS), [A] * 10, BeamSearchParams(max_new_tokens=60))
