"""N-gram decontamination (components/evaluate/decontaminate.py): overlap shares computed by hand on
small texts, reading a curated split folder, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.components.evaluate.decontaminate import NgramIndex, decontamination_report, words
from lmforge.errors import InputNotFoundError, UserError

TRAIN = [
    "the quick brown fox jumps over the lazy dog",
    "a completely different sentence about serving models",
]


def test_words_ignore_case_and_punctuation():
    assert words("The Quick, brown-fox: jumps!") == ["the", "quick", "brown", "fox", "jumps"]


def test_overlap_is_the_share_of_the_items_ngrams_found():
    index = NgramIndex.from_texts(TRAIN, n=3)
    assert len(index) == 7 + 5  # distinct 3-grams of the two documents
    assert index.overlap("the quick brown fox") == 1.0  # 2 of 2 trigrams
    # trigrams: "quick brown fox" (found), "brown fox sleeps" (not), "fox sleeps today" (not)
    assert index.overlap("Quick brown FOX sleeps today") == pytest.approx(1 / 3)
    assert index.overlap("nothing in common with the corpus at all") == 0.0


def test_ngrams_never_span_two_documents():
    index = NgramIndex.from_texts(TRAIN, n=3)
    # "lazy dog a" would exist only if the two documents were concatenated
    assert index.overlap("over the lazy dog a completely") == pytest.approx(2 / 4)


def test_item_shorter_than_n_is_never_contaminated_and_counted_as_too_short():
    index = NgramIndex.from_texts(TRAIN, n=13)
    assert index.overlap("the quick brown fox") == 0.0
    assert not index.contaminated("the quick brown fox", 0.5)
    report = decontamination_report({"short": ["the quick brown fox"]}, index, 0.5)
    assert report == {"short": {"items": 1, "contaminated": 0, "share": 0.0, "too_short": 1}}


def test_contaminated_uses_the_threshold_inclusively():
    index = NgramIndex.from_texts(TRAIN, n=3)
    item = "Quick brown FOX sleeps today"  # overlap 1/3
    assert index.contaminated(item, 1 / 3)
    assert not index.contaminated(item, 0.34)
    with pytest.raises(UserError, match="threshold"):
        index.contaminated(item, 0.0)


def test_report_per_task():
    index = NgramIndex.from_texts(TRAIN, n=3)
    report = decontamination_report(
        {
            "a": ["the quick brown fox jumps", "unrelated words only here", "serving models is fun"],
            "b": [],
        },
        index,
        threshold=0.5,
    )
    assert report["a"] == {"items": 3, "contaminated": 1, "share": pytest.approx(1 / 3), "too_short": 0}
    assert report["b"] == {"items": 0, "contaminated": 0, "share": 0.0, "too_short": 0}


def test_hashes_are_stable_across_indexes():
    """Hashes come from BLAKE2b, not Python's salted hash(): two builds hold the same array."""
    a = NgramIndex.from_texts(TRAIN, n=2)
    b = NgramIndex.from_texts(list(reversed(TRAIN)), n=2)
    assert a.hashes.tolist() == b.hashes.tolist()


def _write_curated(root: Path) -> Path:
    for split, texts in {"train": TRAIN, "validation": ["held out text never trained on here"]}.items():
        (root / split).mkdir(parents=True)
        with open(root / split / "part-00000.jsonl", "w") as fh:
            for i, text in enumerate(texts):
                fh.write(json.dumps({"id": f"{split}-{i}", "text": text, "source": "x"}) + "\n")
    return root


def test_from_dataset_reads_the_train_split_of_a_curated_folder(tmp_path):
    data = _write_curated(tmp_path / "data")
    for path in (data, data / "train", data / "train" / "part-00000.jsonl"):
        index = NgramIndex.from_dataset(path, n=3)
        assert index.documents == 2
        assert index.overlap("jumps over the lazy dog") == 1.0
        assert index.overlap("held out text never trained") == 0.0  # validation is not indexed


def test_from_dataset_bad_input(tmp_path):
    with pytest.raises(InputNotFoundError):
        NgramIndex.from_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.jsonl"):
        NgramIndex.from_dataset(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "content": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: no string field 'text'"):
        NgramIndex.from_dataset(bad)
    with pytest.raises(UserError, match="n-gram size"):
        NgramIndex.from_texts(TRAIN, n=0)
