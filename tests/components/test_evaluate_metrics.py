"""Text metrics equal the libraries' own values (sacrebleu, rouge-score) and the SQuAD / harness rules."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmforge.components.evaluate.metrics import (
    choice_prediction,
    exact_match,
    generation_metrics,
    normalize_answer,
    token_f1,
)

PREDS = ["the cat sat on the mat", "a quick brown dog", "Paris is the capital of France."]
REFS = ["the cat is on the mat", "the quick brown fox", "The capital of France is Paris."]


def test_bleu_and_chrf_are_sacrebleu_corpus_scores():
    task, items = generation_metrics(PREDS, REFS, ["bleu", "chrf"])
    assert task["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    assert task["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score)
    assert 0 < task["bleu"] < 100 and 0 < task["chrf"] < 100
    assert items[0]["bleu"] == pytest.approx(sacrebleu.sentence_bleu(PREDS[0], [REFS[0]]).score)
    same, _ = generation_metrics(REFS, REFS, ["bleu", "chrf"])
    assert same == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}


def test_rouge_is_rouge_score_f_measure_averaged():
    task, items = generation_metrics(PREDS, REFS, ["rouge1", "rouge2", "rougeL"])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = [scorer.score(r, p) for p, r in zip(PREDS, REFS, strict=True)]
    for name in ("rouge1", "rouge2", "rougeL"):
        assert task[name] == pytest.approx(sum(e[name].fmeasure for e in expected) / 3)
        assert [i[name] for i in items] == pytest.approx([e[name].fmeasure for e in expected])
    # by hand: 5 of 6 unigrams shared both ways -> P = R = F = 5/6
    assert items[0]["rouge1"] == pytest.approx(5 / 6)


def test_squad_exact_match_and_token_f1():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel tower") == 0.0
    # pred {cat, sat}, ref {cat, sat, down}: P = 1, R = 2/3 -> F1 = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("a", "cat") == 0.0
    task, _ = generation_metrics(
        ["the cat sat", "Paris"], ["a cat sat down", "paris"], ["exact_match", "token_f1"]
    )
    assert task == {"exact_match": pytest.approx(0.5), "token_f1": pytest.approx(0.9)}


def test_acc_and_acc_norm_as_the_harness_defines_them():
    # the long choice has the higher total log-likelihood per character, the short one the higher total
    logprobs, choices = [-4.0, -6.0], ["ab", "abcdefgh"]
    assert choice_prediction(logprobs, choices) == (0, 1)
