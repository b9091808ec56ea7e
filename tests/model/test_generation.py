"""Token-level generation: parity with Hugging Face, KV cache vs recomputation, batching, sampling
parameters and their validation, logprobs, scoring, streaming, allow-list constraints."""

import itertools
import math

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.constrained import AllowedTokens
from lmforge.model.generation import (
    SamplingParams,
    SamplingParamsError,
    apply_penalties,
    generate,
    generate_batch,
    min_p_filter,
    score,
    score_batch,
    stream,
    top_k_filter,
    top_p_filter,
)
from lmforge.model.transformer import Transformer

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model():
    # untied, larger init: random weights that produce varied, well-separated greedy choices
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny", init_std=0.2, tie_embeddings=False)).eval()


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], list(range(100, 120)), [42]]


def full_recompute_greedy(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.slow  # importing transformers takes seconds
def test_greedy_matches_hugging_face_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.model.checkpoint import save_model_dir

    save_model_dir(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    for prompt in PROMPTS[:3]:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert generate(model, prompt, GREEDY).token_ids == ref[0, len(prompt) :].tolist()


def test_kv_cache_generation_equals_full_recomputation(model):
    for prompt in PROMPTS:
        out = generate(model, prompt, GREEDY)
        assert out.token_ids == full_recompute_greedy(model, prompt, 12)
        assert out.completions[0].finish_reason == "length"


def test_batched_equals_unbatched(model):
    alone = [generate(model, p, GREEDY).token_ids for p in PROMPTS]
    together = [o.token_ids for o in generate_batch(model, PROMPTS, GREEDY)]
    assert together == alone
    assert len({tuple(t) for t in alone}) == len(PROMPTS)  # the prompts really lead to different outputs


def test_seeded_sampling_reproduces_and_samples_share_prefill(model):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=123)
    a, b = generate(model, PROMPTS[0], params), generate(model, PROMPTS[0], params)
    assert a.token_ids == b.token_ids
    other = generate(
        model, PROMPTS[0], SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=124)
    )
    assert other.token_ids != a.token_ids
    # n samples share one prefill; sample i is seeded with seed + i, so it equals a run with that seed
    many = generate(
        model, PROMPTS[0], SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=123, n=3)
    )
    assert many.completions[0].token_ids == a.token_ids
    assert many.completions[1].token_ids == other.token_ids
    assert len({tuple(c.token_ids) for c in many.completions}) == 3
    # a seeded request's output does not depend on what it is batched with
    batched = generate_batch(model, [PROMPTS[1], PROMPTS[0]], params)
    assert batched[1].token_ids == a.token_ids


def test_stop_token_ids_end_the_sequence(model):
    free = generate(model, PROMPTS[0], GREEDY).token_ids
    stop_at = free[4]
    first = free.index(stop_at)
    out = generate(
        model, PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop_at,))
    )
    assert out.token_ids == free[: first + 1]
    assert out.completions[0].finish_reason == "stop"


def test_model_eos_stops_unless_ignored(model):
    free = generate(model, PROMPTS[1], GREEDY).token_ids
    cfg = ModelConfig.from_name("tiny", init_std=0.2, tie_embeddings=False, eos_token_id=free[2])
    with_eos = Transformer(cfg).eval()
    with_eos.load_state_dict(model.state_dict())
    assert generate(with_eos, PROMPTS[1], GREEDY).token_ids == free[: free.index(free[2]) + 1]
    ignored = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    assert generate(with_eos, PROMPTS[1], ignored).token_ids == free


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"n": 0}, "n"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"seed": -1}, "seed"),
        ({"logprobs": 99}, "logprobs"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
        ({"stop_token_ids": "1"}, "stop_token_ids"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError, match=f"sampling.{field} "):
        SamplingParams(**kwargs)


def test_max_new_tokens_beyond_context_is_refused(model):
    context = model.config.max_seq_len
    with pytest.raises(
        SamplingParamsError,
        match=r"max_new_tokens=250 plus the prompt's 10 tokens exceeds the context of 256",
    ):
        generate(model, list(range(10)), SamplingParams(max_new_tokens=250))
    with pytest.raises(SamplingParamsError, match="prompt is empty"):
        generate(model, [], SamplingParams())
    # exactly filling the context is fine
    out = generate(model, [1] * (context - 2), SamplingParams(max_new_tokens=2, temperature=0))
    assert len(out.token_ids) == 2


def test_logits_filters():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, True, False, True, True]]
    # probabilities ~ [.64, .09, .24, .03, .01]: 0.7 needs the two most likely tokens
    assert torch.isinf(top_p_filter(logits, 0.7)).tolist() == [[False, True, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [[False, True, True, True, True]]
    assert not torch.isinf(top_p_filter(logits, 1.0)).any()
    # min_p 0.1 keeps tokens with p >= 0.064
    assert torch.isinf(min_p_filter(logits, 0.1)).tolist() == [[False, False, False, True, True]]


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    counts = torch.tensor([0, 1, 3, 0])
    seen = torch.tensor([True, True, True, False])  # token 0 is only in the prompt
    rep = apply_penalties(logits, counts, seen, repetition=2.0, frequency=0.0, presence=0.0)
    assert rep.tolist() == [1.0, -4.0, 0.5, 0.5]
    freq = apply_penalties(logits, counts, seen, repetition=1.0, frequency=0.5, presence=1.0)
    assert freq.tolist() == [2.0, -3.5, -1.5, 0.5]


def test_repetition_penalty_prevents_repeats(model):
    params = SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1e6)
    out = generate(model, PROMPTS[0], params).token_ids
    assert len(set(out)) == len(out) and not set(out) & set(PROMPTS[0])
    assert (
        len(set(generate(model, PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=0)).token_ids)) < 20
    )


def test_top_k_one_is_greedy(model):
    sampled = generate(model, PROMPTS[2], SamplingParams(max_new_tokens=12, temperature=1.3, top_k=1, seed=5))
    assert sampled.token_ids == generate(model, PROMPTS[2], GREEDY).token_ids


def test_logprobs_of_chosen_and_top_alternatives(model):
    prompt = PROMPTS[0]
    out = generate(model, prompt, SamplingParams(max_new_tokens=4, temperature=1.0, seed=0, logprobs=3))
    lps = out.completions[0].logprobs
    assert [lp.token_id for lp in lps] == out.token_ids
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + out.token_ids])).float(), -1)[0]
    for i, lp in enumerate(lps):
        expected = full[len(prompt) - 1 + i]
        assert lp.logprob == pytest.approx(float(expected[lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == expected.topk(3).indices.tolist()
        assert all(a >= b for (_, a), (_, b) in itertools.pairwise(lp.top))


def test_score_equals_the_models_log_likelihood(model):
    prompt = PROMPTS[0]
    greedy = generate(model, prompt, GREEDY).token_ids
    result = score(model, prompt, greedy[:5])
    assert result.is_greedy
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + greedy[:5]])).float(), -1)[0]
    expected = [float(full[len(prompt) - 1 + i, t]) for i, t in enumerate(greedy[:5])]
    assert result.token_logprobs == pytest.approx(expected, abs=1e-5)
    assert result.logprob == pytest.approx(sum(expected), abs=1e-4)
    other = score(model, prompt, [greedy[0], (greedy[1] + 1) % 1024])
    assert not other.is_greedy
    pairs = [(prompt, greedy[:5]), (PROMPTS[1], [3, 4, 5]), (PROMPTS[2], [9])]
    batched = score_batch(model, pairs, batch_size=2)
    for (ctx, cont), got in zip(pairs, batched, strict=True):
        assert got.logprob == pytest.approx(score(model, ctx, cont).logprob, abs=1e-4)
    with pytest.raises(ValueError, match="pair 0"):
        score(model, prompt, [])


def test_stream_yields_tokens_in_order_and_stops_when_closed(model):
    events = list(stream(model, PROMPTS[0], GREEDY))
    assert [e.token_id for e in events] == generate(model, PROMPTS[0], GREEDY).token_ids
    assert [e.finish_reason for e in events] == [None] * 11 + ["length"]
    gen = stream(model, PROMPTS[0], SamplingParams(max_new_tokens=200, temperature=0))
    first = [next(gen) for _ in range(3)]
    gen.close()  # a consumer that stops reading stops the work
    assert [e.token_id for e in first] == [e.token_id for e in events[:3]]
    with pytest.raises(StopIteration):
        next(gen)


def test_allow_list_constraint(model):
    allowed = [10, 20, 30]
    constraint = AllowedTokens(allowed, vocab_size=1024)
    out = generate(
        model, PROMPTS[0], SamplingParams(max_new_tokens=8, temperature=1.0, seed=1), constraint=constraint
    )
    assert len(out.token_ids) == 8 and set(out.token_ids) <= set(allowed)
    short = AllowedTokens(allowed, vocab_size=1024, max_tokens=2)
    out = generate(model, PROMPTS[0], SamplingParams(max_new_tokens=8, temperature=0), constraint=short)
    assert len(out.token_ids) == 2 and out.completions[0].finish_reason == "stop"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        AllowedTokens([5000], vocab_size=1024)
