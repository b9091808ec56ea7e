"""The continuous-batching engine: admission control, cancellation, requests joining mid-run,
slot reuse, mixed sampling settings, and the background driver (sync and asyncio streams)."""

import asyncio

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.engine import Engine, EngineDriver, QueueFull
from lmforge.model.generation import (
    Completion,
    GenerationOutput,
    SamplingParams,
    SamplingParamsError,
    collect,
    generate,
)
from lmforge.model.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny", init_std=0.2, tie_embeddings=False)).eval()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0)


def run_to_end(engine: Engine, outputs: dict[str, GenerationOutput]) -> None:
    while engine.has_work():
        collect(iter(engine.step()), outputs)


def track(engine: Engine, prompt, params, outputs, **kw) -> str:
    rid = engine.submit(prompt, params, **kw)
    outputs[rid] = GenerationOutput(rid, list(prompt), [Completion(i) for i in range(params.n)])
    return rid


def test_queue_limit_refuses_with_a_clear_error(model):
    engine = Engine(model, num_slots=1, max_queue=2, max_len=64)
    engine.submit([1, 2], greedy(3))
    engine.submit([3, 4], greedy(3))
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit([5, 6], greedy(3))
    engine.step()  # the first request takes the slot, freeing a place in the queue
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.submit([5, 6], greedy(3))
    finished = []
    while engine.has_work():
        finished += [e.request_id for e in engine.step() if e.finish_reason]
    assert sorted(finished) == ["req-0", "req-1", "req-2"]
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_requests_that_can_never_run_are_refused_at_submit(model):
    engine = Engine(model, num_slots=2, max_len=32)
    with pytest.raises(SamplingParamsError, match="exceeds the context of 32"):
        engine.submit(list(range(20)), greedy(13))
    with pytest.raises(ValueError, match="sampling.n=3 exceeds the engine's 2 slots"):
        engine.submit([1], SamplingParams(n=3, max_new_tokens=2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([1, 5000], greedy(2))
    with pytest.raises(ValueError, match="exceeds the model.s context of 256"):
        Engine(model, num_slots=1, max_len=10_000)  # longer than the model's context


def test_requests_joining_mid_run_match_running_alone(model):
    prompts = {"a": [1, 2, 3, 4, 5], "b": [7, 8], "c": list(range(100, 117)), "d": [42, 43, 44]}
    alone = {k: generate(model, p, greedy(10)).token_ids for k, p in prompts.items()}
    engine = Engine(model, num_slots=3, max_len=64)
    outputs: dict[str, GenerationOutput] = {}
    track(engine, prompts["a"], greedy(10), outputs, request_id="a")
    for _ in range(3):
        collect(iter(engine.step()), outputs)
    track(engine, prompts["b"], greedy(10), outputs, request_id="b")
    collect(iter(engine.step()), outputs)
    track(engine, prompts["c"], greedy(10), outputs, request_id="c")
    track(engine, prompts["d"], greedy(10), outputs, request_id="d")  # waits: all 3 slots are busy
    collect(iter(engine.step()), outputs)
    assert engine.num_running == 3 and engine.num_waiting == 1
    run_to_end(engine, outputs)
    assert {k: o.token_ids for k, o in outputs.items()} == alone


def test_cancellation_frees_the_slot_for_the_next_request(model):
    engine = Engine(model, num_slots=1, max_len=128)
    outputs: dict[str, GenerationOutput] = {}
    long = track(engine, [1, 2, 3], greedy(100), outputs)
    short = track(engine, [7, 8], greedy(6), outputs)
    for _ in range(4):
        collect(iter(engine.step()), outputs)
    assert engine.num_waiting == 1  # the short request is stuck behind the long one
    assert engine.cancel(long)
    events = engine.step()
    assert any(e.request_id == long and e.finish_reason == "cancelled" and e.token_id is None for e in events)
    assert any(e.request_id == short and e.token_id is not None for e in events)  # admitted in the same step
    collect(iter(events), outputs)
    run_to_end(engine, outputs)
    assert outputs[long].completions[0].finish_reason == "cancelled"
    assert len(outputs[long].token_ids) == 5  # prefill + decode in the first step, then one per step
    assert outputs[short].token_ids == generate(model, [7, 8], greedy(6)).token_ids
    assert not engine.cancel(long)  # already gone
    assert not engine.cancel("no-such-request")


def test_cancelling_a_waiting_request(model):
    engine = Engine(model, num_slots=1, max_len=64)
    first = engine.submit([1], greedy(5))
    waiting = engine.submit([2], SamplingParams(max_new_tokens=5, n=1))
    engine.cancel(waiting)
    events = engine.step()
    assert [(e.request_id, e.finish_reason) for e in events if e.request_id == waiting] == [
        (waiting, "cancelled")
    ]
    assert engine.num_waiting == 0 and engine.num_running == 1
    assert all(e.request_id == first for e in engine.step())


def test_slots_are_reused_and_memory_is_fixed(model):
    engine = Engine(model, num_slots=2, max_len=32)
    cache_k = engine.cache.k
    outputs: dict[str, GenerationOutput] = {}
    for i in range(7):
        track(engine, [i + 1, i + 2], greedy(3 + i % 3), outputs)
    peak = 0
    while engine.has_work():
        collect(iter(engine.step()), outputs)
        peak = max(peak, engine.num_running)
    assert peak == 2 and engine.cache.k is cache_k
    for out in outputs.values():
        assert out.token_ids == generate(model, out.prompt_ids, greedy(len(out.token_ids))).token_ids


def test_mixed_sampling_settings_in_one_batch(model):
    sampled = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7, logprobs=2)
    penalized = SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.3)
    engine = Engine(model, num_slots=4, max_len=64)
    outputs: dict[str, GenerationOutput] = {}
    a = track(engine, [1, 2, 3], greedy(8), outputs)
    b = track(engine, [4, 5], sampled, outputs)
    c = track(engine, [6], penalized, outputs)
    run_to_end(engine, outputs)
    assert outputs[a].token_ids == generate(model, [1, 2, 3], greedy(8)).token_ids
    assert outputs[b].token_ids == generate(model, [4, 5], sampled).token_ids
    assert len(outputs[b].completions[0].logprobs) == 8
    assert outputs[c].token_ids == generate(model, [6], penalized).token_ids


def test_driver_streams_requests_from_threads(model):
    prompts = [[1, 2, 3], [9, 8, 7, 6], [5]]
    expected = [generate(model, p, greedy(6)).token_ids for p in prompts]
    with EngineDriver(Engine(model, num_slots=2, max_len=32)) as driver:
        streams = [driver.submit(p, greedy(6)) for p in prompts]
        got = [[e.token_id for e in s] for s in streams]
    assert got == expected


def test_driver_async_streams_and_cancel(model):
    async def main():
        with EngineDriver(Engine(model, num_slots=2, max_len=256)) as driver:
            done = driver.submit([1, 2, 3], greedy(6))
            endless = driver.submit([4, 5], greedy(200))
            tokens = [e.token_id async for e in done]
            seen = []
            async for event in endless:
                seen.append(event)
                if len(seen) == 3:
                    endless.cancel()
            return tokens, seen

    tokens, seen = asyncio.run(main())
    assert tokens == generate(model, [1, 2, 3], greedy(6)).token_ids
    assert seen[-1].finish_reason == "cancelled" and len(seen) < 200


def test_driver_fails_streams_instead_of_hanging(model):
    engine = Engine(model, num_slots=1, max_len=32)

    def broken():
        raise RuntimeError("device lost")

    engine.step = broken
    with EngineDriver(engine) as driver:
        stream = driver.submit([1, 2], greedy(3))
        with pytest.raises(RuntimeError, match="device lost"):
            list(stream)
        with pytest.raises(RuntimeError, match="stopped after an error"):
            driver.submit([1, 2], greedy(3))


@pytest.mark.slow  # torch.compile takes tens of seconds on CPU
def test_compiled_static_shape_engine_matches_eager():
    """compile=True decodes every slot over the full cache with static shapes (what CUDA graphs
    need); it must produce what the eager engine does, also with the decode weight layout."""
    from lmforge.model.decode_layout import apply_decode_layout
    from lmforge.model.generation import generate_batch

    torch.manual_seed(0)
    model = apply_decode_layout(
        Transformer(ModelConfig.from_name("tiny", init_std=0.2, vocab_size=8192)).eval()
    )
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    eager = [o.token_ids for o in generate_batch(model, prompts, greedy(8))]
    compiled = [o.token_ids for o in generate_batch(model, prompts, greedy(8), compile=True)]
    assert compiled == eager
    # one slot: every projection becomes a fused matrix-vector reduction over row-major weights
    single = generate_batch(model, prompts[:1], greedy(8), compile=True)[0].token_ids
    assert single == eager[0]
    assert model.model.layers[0].mlp.gate_proj.weight.is_contiguous()  # laid out row-major for it


def test_driver_delivers_every_sample_of_an_n_request(model):
    """All n samples finish in the same step; the stream must still end after the last of them."""
    params = SamplingParams(max_new_tokens=5, temperature=0, n=3)
    with EngineDriver(Engine(model, num_slots=4, max_len=32)) as driver:
        events = list(driver.submit([1, 2, 3], params))

        async def consume():
            return [e async for e in driver.submit([4, 5], params)]

        async_events = asyncio.run(asyncio.wait_for(consume(), timeout=60))
    for got in (events, async_events):
        finished = sorted(e.index for e in got if e.finish_reason is not None)
        assert finished == [0, 1, 2]
        per_sample = [[e.token_id for e in got if e.index == i and e.token_id is not None] for i in range(3)]
        assert per_sample[0] == per_sample[1] == per_sample[2] and len(per_sample[0]) == 5


@pytest.mark.slow  # three small torch.compile runs on CPU
def test_compiled_engines_side_by_side_keep_their_own_models_and_caches():
    """Compiled engines share one decode function's code, and after warm-up Dynamo's guards are
    skipped: interleaved steps of engines over different weights, depths and caches must still
    each produce their own model's eager output (an A/B split serves two versions this way)."""
    from lmforge.model.generation import generate

    def tiny(seed: int, **overrides) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(ModelConfig.from_name("tiny", init_std=0.2, **overrides)).eval()

    models = [tiny(0), tiny(1), tiny(2, n_layers=1)]  # same shapes, other weights; another depth
    prompt = [3, 1, 4, 1, 5]
    expected = [generate(m, prompt, greedy(6)).token_ids for m in models]
    assert len({tuple(e) for e in expected}) > 1  # the models really disagree
    engines = [Engine(m, num_slots=1, max_len=32, compile=True) for m in models]
    for _ in range(2):  # the second round runs with guard evaluation skipped
        outputs: list[list[int]] = [[] for _ in engines]
        for engine in engines:
            engine.submit(prompt, greedy(6))
        while any(e.has_work() for e in engines):
            for i, engine in enumerate(engines):
                if engine.has_work():
                    outputs[i] += [ev.token_id for ev in engine.step() if ev.token_id is not None]
        assert outputs == expected
