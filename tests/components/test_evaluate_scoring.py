"""Perplexity scoring: by-hand exp(mean NLL), sliding windows, batching, and parity with transformers."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from _evaluate_data import DOCS, make_model

from lmforge.components.evaluate.scoring import continuation_pairs, document_nlls, rolling_windows
from lmforge.components.evaluate.suite import Task, TaskConfig
from lmforge.components.evaluate.tasks import run_perplexity
from lmforge.model.checkpoint import load_model_dir
from lmforge.tokenizer_files import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    path = make_model(tokenizer_dir, tmp_path_factory.mktemp("eval-model") / "m", max_seq_len=32)
    return load_model_dir(path).eval(), load_tokenizer(path)


def _task(docs: list[str]) -> Task:
    return Task(
        TaskConfig(name="t", type="perplexity", data="x"), [{"text": d} for d in docs], ["x"] * len(docs)
    )


@pytest.mark.parametrize("length", [2, 3, 10, 33, 64, 100])
@pytest.mark.parametrize(("window", "stride"), [(8, 8), (8, 3), (8, 1), (32, 32)])
def test_rolling_windows_score_every_token_once(length, window, stride):
    scored = []
    for w in rolling_windows(length, window, stride):
        assert w.end - w.start <= window and w.scored <= w.end - w.start
        scored += range(w.end - w.scored + 1, w.end + 1)  # the target positions this window scores
    assert scored == list(range(1, length))


def test_perplexity_is_exp_mean_nll_by_hand(tiny):
    model, tokenizer = tiny
    docs = DOCS[:3]  # each shorter than the context: one forward per document
    outcome = run_perplexity(model, tokenizer, _task(docs), None, None, batch_size=2)
    nll, tokens = 0.0, 0
    for doc in docs:
        ids = [model.config.bos_token_id, *tokenizer.encode(doc, add_special_tokens=False).ids]
        assert len(ids) <= 32
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        nll -= sum(logprobs[t - 1, ids[t]].item() for t in range(1, len(ids)))
        tokens += len(ids) - 1
    m = outcome.metrics
    assert m["tokens"] == tokens and m["items"] == 3
    assert m["bytes"] == sum(len(d.encode()) for d in docs)
    assert m["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(nll / m["bytes"] / math.log(2), rel=1e-5)


def test_stride_equal_to_window_is_chunked_evaluation(tiny):
    model, tokenizer = tiny
    ids = [model.config.bos_token_id, *tokenizer.encode(DOCS[4] * 2, add_special_tokens=False).ids]
    window = 16
    assert len(ids) > 3 * window
    [(nll, count)] = document_nlls(model, [ids], window, window, batch_size=3)
    by_chunk = 0.0
    for start in range(0, len(ids) - 1, window):  # each chunk alone: ids[start:start+W] -> next tokens
        chunk = ids[start : start + window + 1]
        with torch.no_grad():
            logits = model(torch.tensor([chunk[:-1]]))[0].float()
        by_chunk += F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
    assert count == len(ids) - 1
    assert nll == pytest.approx(by_chunk, rel=1e-5)


def test_batching_and_overlap_keep_the_token_count(tiny):
    model, tokenizer = tiny
    seqs = [[0, *tokenizer.encode(d * 3, add_special_tokens=False).ids] for d in DOCS]
    one = document_nlls(model, seqs, 16, 16, batch_size=1)
    many = document_nlls(model, seqs, 16, 16, batch_size=8)
    for (a, n), (b, m) in zip(one, many, strict=True):
        assert n == m and a == pytest.approx(b, rel=1e-4)
    overlapped = document_nlls(model, seqs, 16, 4, batch_size=8)
    assert [n for _, n in overlapped] == [n for _, n in one]
    assert any(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(one, overlapped, strict=True))


def test_perplexity_matches_transformers_on_a_llama_checkpoint(tmp_path, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tok = load_tokenizer(tokenizer_dir)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, tmp_path / "hf" / name)
    ours = load_model_dir(tmp_path / "hf").eval()
    outcome = run_perplexity(ours, tok, _task(DOCS), None, None, batch_size=4)
    nll, tokens = 0.0, 0
    for doc in DOCS:
        ids = torch.tensor([[0, *tok.encode(doc, add_special_tokens=False).ids]])
        with torch.no_grad():
            loss = hf(ids, labels=ids).loss.item()  # mean over the len - 1 predicted tokens
        nll += loss * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert outcome.metrics["tokens"] == tokens
    assert outcome.metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=0.005)


def test_continuation_split_as_the_harness_does(tokenizer):
    def encode(text):
        return tokenizer.encode(text).ids

    ctx, cont = continuation_pairs(encode, "The quick brown fox ", "jumps", 64)
    # the trailing space moves to the continuation; together they are the whole text's ids
    assert ctx + cont == encode("The quick brown fox jumps")
    assert ctx == encode("The quick brown fox")
    ctx, cont = continuation_pairs(encode, "The quick brown fox", " jumps over", 4)
    assert len(ctx) + len(cont) <= 4 and len(ctx) >= 1
