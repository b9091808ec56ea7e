"""lm-evaluation-harness on an lmforge model (components/evaluate/harness.py): `lm_eval.simple_evaluate`
runs local task YAMLs over local JSON data (no hub), and each request type returns what lmforge's
own scoring and generation compute by hand."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from _evaluate_data import DOCS, make_model

pytest.importorskip("lm_eval")  # the optional `eval-harness` extra (installed by `dev`)

pytestmark = pytest.mark.slow  # importing lm_eval and datasets takes seconds

CHOICE = [
    {
        "question": "The quick brown fox",
        "choices": ["jumps over", "zebra crossing", "naïve café"],
        "answer": 0,
    },
    {"question": "Serving language", "choices": ["models", "emoji", "return a + b"], "answer": 0},
    {"question": "def add(a, b):", "choices": ["return a + b", "the lazy dog"], "answer": 1},
    {"question": "Héllo wörld:", "choices": ["naïve café", "tickets", "manuals and more"], "answer": 2},
]
GEN = [{"question": d[:20], "answer": d[20:30]} for d in DOCS[:3]]
PPL = [{"text": d} for d in DOCS]


def _task_files(root, cache):
    data = {}
    for name, rows in (("choice", CHOICE), ("gen", GEN), ("ppl", PPL)):
        data[name] = root / f"{name}.json"
        data[name].write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")

    def header(name: str) -> str:
        return (
            f"task: lmforge_{name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files: {{test: {data[name]}}}\n  cache_dir: {cache}\n"
            "test_split: test\n"
        )

    (root / "choice.yaml").write_text(
        header("choice") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: choices\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (root / "gen.yaml").write_text(
        header("gen") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs: {until: ["\\n"], max_gen_toks: 8, do_sample: false}\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    (root / "ppl.yaml").write_text(
        header("ppl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n"
    )


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory, tokenizer_dir):
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmforge.components.evaluate.harness import LmforgeLM

    root = tmp_path_factory.mktemp("harness")
    _task_files(root, root / "hf-cache")
    model_dir = make_model(tokenizer_dir, root / "model", max_seq_len=128)
    lm = LmforgeLM(model_dir, batch_size=3)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["lmforge_choice", "lmforge_gen", "lmforge_ppl"],
        task_manager=TaskManager(include_path=str(root)),
        log_samples=True,
    )
    return lm, res


def _logprob(lm, context: str, continuation: str) -> float:
    """log P(continuation | context) with one plain forward over the whole text."""
    ctx = lm.tokenizer.encode(context, add_special_tokens=False).ids
    whole = lm.tokenizer.encode(context + continuation, add_special_tokens=False).ids
    assert whole[: len(ctx)] == ctx  # these texts do not merge across the boundary
    with torch.no_grad():
        logprobs = F.log_softmax(lm.model(torch.tensor([whole])).float(), -1)[0]
    return sum(float(logprobs[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


def test_choice_accuracy_equals_argmax_of_lmforge_loglikelihoods(harness_run):
    lm, res = harness_run
    correct = correct_norm = 0
    for item in CHOICE:
        # the harness puts its target delimiter " " before each choice and normalises by the
        # choice's length in characters
        lls = [_logprob(lm, item["question"], " " + c) for c in item["choices"]]
        norm = [ll / len(c) for ll, c in zip(lls, item["choices"], strict=True)]
        correct += max(range(len(lls)), key=lls.__getitem__) == item["answer"]
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == item["answer"]
    results = res["results"]["lmforge_choice"]
    assert results["acc,none"] == pytest.approx(correct / len(CHOICE))
    assert results["acc_norm,none"] == pytest.approx(correct_norm / len(CHOICE))
    # the per-choice log-likelihoods themselves
    sample = res["samples"]["lmforge_choice"][0]
    expected = [_logprob(lm, CHOICE[0]["question"], " " + c) for c in CHOICE[0]["choices"]]
    got = [float(r[0][0]) for r in sample["resps"]]
    assert got == pytest.approx(expected, abs=1e-4)


def test_rolling_loglikelihood_scores_every_token_after_bos(harness_run):
    lm, res = harness_run
    total_nll = total_bytes = 0.0
    for doc in DOCS:
        ids = [lm.start, *lm.tokenizer.encode(doc, add_special_tokens=False).ids]
        with torch.no_grad():
            logprobs = F.log_softmax(lm.model(torch.tensor([ids])).float(), -1)[0]
        total_nll -= sum(float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids)))
        total_bytes += len(doc.encode())
    bpb = res["results"]["lmforge_ppl"]["bits_per_byte,none"]
    assert bpb == pytest.approx(total_nll / total_bytes / math.log(2), rel=1e-4)


def test_generate_until_equals_lmforge_greedy_generation(harness_run):
    from lmforge.model.generation import SamplingParams
    from lmforge.serving.textgen import generate_text

    lm, res = harness_run
    samples = sorted(res["samples"]["lmforge_gen"], key=lambda s: s["doc_id"])
    assert len(samples) == len(GEN)
    for item, sample in zip(GEN, samples, strict=True):
        want = generate_text(
            lm.model, lm.tokenizer, item["question"], SamplingParams(max_new_tokens=8, temperature=0), ["\n"]
        ).text
        assert sample["resps"][0][0] == want
    exact = sum(s["resps"][0][0].strip() == i["answer"].strip() for i, s in zip(GEN, samples, strict=True))
    assert res["results"]["lmforge_gen"]["exact_match,none"] == pytest.approx(exact / len(GEN))


def test_model_object_needs_its_tokenizer(harness_run):
    from lmforge.components.evaluate.harness import LmforgeLM

    lm, _ = harness_run
    with pytest.raises(ValueError, match="tokenizer"):
        LmforgeLM(lm.model)
    assert LmforgeLM(lm.model, lm.tokenizer).context_len == 128
