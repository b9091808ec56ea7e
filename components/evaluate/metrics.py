"""Quality metrics over text, computed with the libraries people cite, so numbers compare across papers.

- BLEU and chrF: `sacrebleu` corpus scores (its default tokenization, 0-100 scale), as WMT reports them;
  samples.jsonl carries sentence-level scores for reading, the task score is the corpus score.
- ROUGE-1/2/L: `rouge-score` F-measures with its Porter stemmer, averaged over items (0-1).
- exact match and token F1: the SQuAD v1.1 evaluation script's definitions (lower-case, strip
  punctuation and the articles a/an/the, collapse whitespace; F1 over the bag of tokens).
- acc / acc_norm: lm-evaluation-harness's multiple-choice metrics: the choice with the highest
  log-likelihood, and the highest log-likelihood per character of the continuation.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ---- SQuAD ------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:  # SQuAD 2.0's rule: both empty = 1, one empty = 0
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---- generation metrics -----------------------------------------------------------------------
def item_scores(prediction: str, reference: str, metrics: Sequence[str], scorer=None) -> dict[str, float]:
    """Per-item scores for samples.jsonl (BLEU/chrF sentence-level here; the task uses corpus scores)."""
    import sacrebleu

    out: dict[str, float] = {}
    rouge = [m for m in metrics if m in ROUGE_TYPES]
    if rouge:
        scorer = scorer or rouge_scorer(rouge)
        scores = scorer.score(reference, prediction)
        out.update({m: float(scores[m].fmeasure) for m in rouge})
    if "bleu" in metrics:
        out["bleu"] = sacrebleu.sentence_bleu(prediction, [reference]).score
    if "chrf" in metrics:
        out["chrf"] = sacrebleu.sentence_chrf(prediction, [reference]).score
    if "exact_match" in metrics:
        out["exact_match"] = exact_match(prediction, reference)
    if "token_f1" in metrics:
        out["token_f1"] = token_f1(prediction, reference)
    return out


def rouge_scorer(types: Sequence[str] = ROUGE_TYPES):
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(types), use_stemmer=True)


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str], metrics: Sequence[str]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(task metrics, per-item scores): corpus BLEU/chrF, item means for the rest."""
    import sacrebleu

    scorer = (
        rouge_scorer([m for m in metrics if m in ROUGE_TYPES]) if set(metrics) & set(ROUGE_TYPES) else None
    )
    per_item = [item_scores(p, r, metrics, scorer) for p, r in zip(predictions, references, strict=True)]
    task: dict[str, float] = {}
    for m in metrics:
        if m == "bleu":
            task[m] = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
        elif m == "chrf":
            task[m] = sacrebleu.corpus_chrf(list(predictions), [list(references)]).score
        else:
            task[m] = sum(s[m] for s in per_item) / len(per_item)
    return task, per_item


# ---- multiple choice --------------------------------------------------------------------------
def choice_prediction(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood per character): lm-evaluation-harness's
    `acc` and `acc_norm` predictions (it normalises by the continuation's length in characters)."""
    best = max(range(len(logprobs)), key=lambda i: logprobs[i])
    best_norm = max(range(len(logprobs)), key=lambda i: logprobs[i] / len(choices[i]))
    return best, best_norm
