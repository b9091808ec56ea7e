"""The tokenizer stage: byte-level BPE training, Hugging Face compatibility, fertility report, errors.

One small tokenizer is trained once per module on the tutorial slice of data/sample (~250 kB, under a
second); error cases use tiny in-memory corpora.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from lmforge.components import tokenizer as tk
from lmforge.components.tokenizer import (
    CorpusError,
    EmptyCorpusError,
    SpecialTokens,
    TokenizerError,
    TokenizerInfo,
    VocabSizeError,
    is_heldout,
    load_tokenizer,
    train_tokenizer,
)
from lmforge.errors import UserError
from lmforge.tokenizer_files import TokenizerNotFoundError

TUTORIAL = Path(__file__).resolve().parents[2] / "data" / "sample" / "python-docs" / "tutorial"
REFERENCE = tk.DEFAULT_REFERENCE_DIR
SAMPLE_TEXT = 'def área(r):\n\treturn 3.14159 * r ** 2  # naïve 🎉 日本語 "quotes"\r\n<|eos|> done'
ROUND_TRIP = [
    "",
    " leading and trailing spaces  ",
    "Grüße, café, naïve, Ærøskøbing",
    "emoji 🎉🐍👩‍💻 and flags 🇫🇷",
    "日本語のテキストと한국어",
    "tabs\tand\r\nwindows lines\n\n\n",
    "control \x00\x01\x7f bytes and \u200b zero width",
    "    indented_code(x=1) -> None:  # comment",
    "spaces before punctuation , . ! ? and do n't drop them",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "python-docs-tok"
    result = train_tokenizer([TUTORIAL], out, vocab_size=1024, holdout_fraction=0.3)
    return result


def _small_corpus(n: int = 40) -> list[str]:
    words = ["tokenizer", "training", "python", "documentation", "bytes", "merge", "pair", "vocabulary"]
    return [" ".join(words[(i + j) % len(words)] for j in range(30)) + f" doc {i}\n" for i in range(n)]


# ---- files and Hugging Face compatibility --------------------------------------------------------


def test_writes_hugging_face_files(trained):
    out = trained.output_dir
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "fertility.json",
        "fertility.md",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    )
    assert config["add_bos_token"] is False and config["model_max_length"] == 2048
    assert "<|im_start|>" in config["chat_template"]
    assert trained.vocab_size == 1024 == trained.requested_vocab_size


def test_transformers_loads_with_identical_ids(trained):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = load_tokenizer(trained.output_dir)
    auto = AutoTokenizer.from_pretrained(trained.output_dir)
    fast = PreTrainedTokenizerFast.from_pretrained(trained.output_dir)
    expected = raw.encode(SAMPLE_TEXT).ids
    assert auto(SAMPLE_TEXT)["input_ids"] == expected
    assert fast(SAMPLE_TEXT)["input_ids"] == expected
    assert 1 in expected  # the literal "<|eos|>" in the text is the eos token for both
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2)
    assert len(auto) == trained.vocab_size
    # the bos behaviour is declared twice and both say the same: add_bos_token is false and the
    # post-processor adds no tokens, so a prompt is encoded without bos everywhere
    assert (
        raw.encode("x y").ids == raw.encode("x y", add_special_tokens=False).ids == auto("x y")["input_ids"]
    )


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_encode_round_trip(trained, text):
    from transformers import AutoTokenizer

    raw = load_tokenizer(trained.output_dir)
    assert raw.decode(raw.encode(text).ids) == text
    auto = AutoTokenizer.from_pretrained(trained.output_dir)
    assert auto.decode(auto(text)["input_ids"]) == text


def test_every_byte_has_a_token_and_no_unk(trained):
    raw = load_tokenizer(trained.output_dir)
    text = bytes(range(256)).decode("latin-1")  # all code points < 256: multi-byte UTF-8 included
    assert raw.decode(raw.encode(text).ids) == text
    assert json.loads((trained.output_dir / "tokenizer.json").read_text())["model"]["unk_token"] is None


def test_special_token_ids_and_info(trained):
    raw = load_tokenizer(trained.output_dir)
    specials = SpecialTokens().all()
    assert [raw.token_to_id(t) for t in specials] == [0, 1, 2, 3, 4]
    assert raw.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 3
    info = TokenizerInfo.from_dir(trained.output_dir)
    assert (info.vocab_size, info.bos_id, info.eos_id, info.pad_id) == (1024, 0, 1, 2)
    assert info.special_tokens == {t: i for i, t in enumerate(specials)}
    assert info.model_max_length == 2048 and info.chat_template


def test_chat_template_renders_chatml(trained):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(trained.output_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A mutable sequence."},
    ]
    rendered = auto.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is a list?<|im_end|>\n"
        "<|im_start|>assistant\nA mutable sequence.<|im_end|>\n"
    )
    prompt = auto.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = auto.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(3) == 3 and ids.count(4) == 3


# ---- fertility report ----------------------------------------------------------------------------


def test_fertility_report_matches_a_recount(trained):
    report = json.loads(trained.fertility_json.read_text())
    rows = {r["name"]: r for r in report["tokenizers"]}
    assert len(rows) == 2 and "smollm2" in rows
    # Recount independently: the held-out files are those whose id (path relative to the input) hashes low.
    files = sorted(TUTORIAL.rglob("*.rst.txt"))
    held = [p for p in files if is_heldout(p.relative_to(TUTORIAL).as_posix(), 0.3)]
    assert 0 < len(held) < len(files)
    assert report["heldout"]["documents"] == len(held) == trained.corpus.heldout_documents
    assert trained.corpus.train_documents == len(files) - len(held)
    texts = [p.read_text(encoding="utf-8") for p in held]
    n_bytes = sum(len(t.encode()) for t in texts)
    n_words = sum(len(t.split()) for t in texts)
    assert report["heldout"]["bytes"] == n_bytes and report["heldout"]["words"] == n_words
    for row, tok_dir in ((trained.fertility[0], trained.output_dir), (rows["smollm2"], REFERENCE)):
        row = row if isinstance(row, dict) else asdict(row)
        tokens = sum(
            len(e.ids) for e in load_tokenizer(tok_dir).encode_batch(texts, add_special_tokens=False)
        )
        assert row["tokens"] == tokens
        assert row["bytes_per_token"] == pytest.approx(n_bytes / tokens, abs=1e-3)
        assert row["tokens_per_word"] == pytest.approx(tokens / n_words, abs=1e-3)
        assert 1.0 < row["tokens_per_word"] < 6.0 and 1.5 < row["bytes_per_token"] < 8.0
    md = trained.fertility_md.read_text()
    assert "| smollm2 | 49,152 |" in md and "tokens/word" in md


def test_missing_default_reference_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "DEFAULT_REFERENCE_DIR", tmp_path / "absent")
    result = train_tokenizer(iter(_small_corpus()), tmp_path / "out", vocab_size=300, holdout_fraction=0.3)
    assert [r.name for r in result.fertility] == ["out (trained)"]
    assert any("reference tokenizer skipped" in n for n in result.notes)
    assert "reference tokenizer skipped" in result.fertility_md.read_text()


def test_no_heldout_documents_is_a_note(tmp_path):
    result = train_tokenizer(
        iter(_small_corpus()), tmp_path / "out", vocab_size=300, holdout_fraction=0.0, reference_tokenizers=[]
    )
    assert result.fertility == [] and any("fertility not measured" in n for n in result.notes)


# ---- inputs --------------------------------------------------------------------------------------


def test_reads_every_supported_kind(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("plain text about merges\n" * 20)
    (corpus / "sub" / "b.md").write_text("# Markdown\n\nsome *markdown* text\n" * 10)
    (corpus / "c.html").write_text(
        "<html><head><title>t</title><style>.zzqq{}</style></head><body><p>html "
        "body text</p><script>var zzqq = 1;</script></body></html>"
    )
    with gzip.open(corpus / "d.rst.gz", "wt", encoding="utf-8") as fh:
        fh.write("Compressed\n==========\n\nrestructured text\n" * 10)
    (corpus / "e.jsonl").write_text(
        json.dumps({"id": "x1", "text": "json line one"})
        + "\n\n"
        + json.dumps({"text": "json line two"})
        + "\n"
    )
    (corpus / "image.png").write_bytes(b"\x89PNG not text")
    result = train_tokenizer(
        [corpus], tmp_path / "out", vocab_size=300, holdout_fraction=0.0, reference_tokenizers=[]
    )
    assert result.corpus.input_files == 5
    assert result.corpus.documents == 6  # the jsonl file holds two documents
    assert result.corpus.skipped_files == [str(corpus / "image.png")]
    assert any("skipped" in n for n in result.notes)
    vocab = load_tokenizer(result.output_dir).get_vocab()
    assert not any("zzqq" in token for token in vocab)  # script and style content never reached training


HTML_PAGES = {
    "page.html": "<html><head><title>T</title></head><body><h1>Title</h1><p>One &amp; two</p>"
    "<pre>  x = 1\n  y</pre></body>",
    "tolerant.html": "<head><title>Guide</title><p>Body   without a closing head<br>next line"
    "<div><p>Unclosed <b>bold<p>Second &amp; last<script>x = 1 < 2",
    "layout.htm": "<body>\n  <ul>\n    <li>first item</li>\n    <li>second   item</li>\n  </ul>\n"
    "<table><tr><td>cell a</td><td>cell b</td></tr></table>\n\n\n<p>Café &eacute; &#x1F600; end.</p>"
    "<style>p { color: red }</style><!-- a comment --><pre>\tdef f():\n\t    return 1   \n</pre></body>",
}


def test_curation_and_tokenizer_training_read_the_same_text_from_html(tmp_path):
    """One HTML-to-text rule (components/curate/markup.py): a page gives tokenizer training exactly the
    text curation writes to the dataset (regression: the tokenizer stage had its own, different parser
    that dropped the title and laid text out differently)."""
    from lmforge.components.curate import CurateConfig, curate
    from lmforge.components.curate.config import DedupConfig, FilterConfig, SplitConfig

    pages = tmp_path / "pages"
    pages.mkdir()
    for name, html in HTML_PAGES.items():
        (pages / name).write_text(html, encoding="utf-8")
    no_filters = FilterConfig(
        **{name: None for name in ("min_words", "max_words", "min_mean_word_length", "max_mean_word_length")},
        min_alpha_fraction=None,
        max_symbol_word_ratio=None,
        max_duplicate_line_fraction=None,
        max_bullet_line_fraction=None,
        max_ellipsis_line_fraction=None,
        bad_phrases=[],
        language=None,
    )
    cfg = CurateConfig(
        filters=no_filters,
        dedup=DedupConfig(exact=False, near=False),
        split=SplitConfig(validation=0.0, test=0.0),
        num_workers=1,
    )
    curate([pages], tmp_path / "curated", cfg, progress=False)
    curated = sorted(
        json.loads(line)["text"]
        for part in sorted((tmp_path / "curated" / "train").glob("part-*.jsonl"))
        for line in part.read_text(encoding="utf-8").splitlines()
    )
    documents, _, _ = tk._documents([pages])
    for_training = sorted("".join(doc.read()) for doc in documents)
    assert len(curated) == len(HTML_PAGES) and for_training == curated
    assert "T\n\nTitle\n\nOne & two\n\n  x = 1\n  y" in curated  # the title, blocks, <pre> kept


def test_training_is_deterministic(tmp_path):
    a = train_tokenizer(iter(_small_corpus()), tmp_path / "a", vocab_size=320, reference_tokenizers=[])
    b = train_tokenizer(iter(_small_corpus()), tmp_path / "b", vocab_size=320, reference_tokenizers=[])
    assert a.tokenizer_json.read_text() == b.tokenizer_json.read_text()


def test_smallest_vocab_is_bytes_plus_specials(tmp_path):
    result = train_tokenizer(iter(_small_corpus()), tmp_path / "out", vocab_size=261, reference_tokenizers=[])
    raw = load_tokenizer(result.output_dir)
    assert result.vocab_size == 261 and raw.decode(raw.encode("héllo 🎉").ids) == "héllo 🎉"


def test_custom_special_tokens(tmp_path):
    specials = SpecialTokens(bos="<s>", eos="</s>", pad="<pad>", extra=("<tool>",))
    result = train_tokenizer(
        iter(_small_corpus()),
        tmp_path / "out",
        vocab_size=300,
        special_tokens=specials,
        reference_tokenizers=[],
    )
    info = TokenizerInfo.from_dir(result.output_dir)
    assert (info.bos_id, info.eos_id, info.pad_id, info.special_tokens["<tool>"]) == (0, 1, 2, 5)


def test_reference_tokenizer_info():
    info = TokenizerInfo.from_dir(REFERENCE)
    assert (info.vocab_size, info.bos_id, info.eos_id) == (49152, 1, 2)


# ---- bad input -----------------------------------------------------------------------------------


def test_error_types_are_user_errors():
    for err in (CorpusError, EmptyCorpusError, VocabSizeError, TokenizerError):
        assert issubclass(err, UserError) and issubclass(err, ValueError)


@pytest.mark.parametrize(
    "vocab_size,match",
    [
        (0, "too small"),
        (100, "too small"),
        (260, "too small"),
        (2.5e4, "must be an integer"),
        (True, "must be an integer"),
    ],
)
def test_vocab_too_small_or_not_int(tmp_path, vocab_size, match):
    with pytest.raises(VocabSizeError, match=f"{match}.*at least 261"):
        train_tokenizer(iter(_small_corpus()), tmp_path / "out", vocab_size=vocab_size)
    assert not (tmp_path / "out").exists()


def test_empty_corpus_errors(tmp_path):
    with pytest.raises(EmptyCorpusError, match="empty"):
        train_tokenizer(iter(["", "  \n", ""]), tmp_path / "o1", vocab_size=300, reference_tokenizers=[])
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "blank.txt").write_text("")
    (empty_dir / "notes.bin").write_bytes(b"\x00")
    with pytest.raises(EmptyCorpusError, match="1 files of unsupported kinds skipped"):
        train_tokenizer([empty_dir], tmp_path / "o2", vocab_size=300, reference_tokenizers=[])
    with pytest.raises(EmptyCorpusError, match="no input paths"):
        train_tokenizer([], tmp_path / "o3", vocab_size=300)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_all_documents_held_out(tmp_path):
    assert is_heldout("text-0", 0.999)
    with pytest.raises(EmptyCorpusError, match="held out"):
        train_tokenizer(iter(["only one document"]), tmp_path / "out", vocab_size=300, holdout_fraction=0.999)


def test_nonexistent_and_unsupported_paths(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        train_tokenizer([tmp_path / "nope"], tmp_path / "out")
    odd = tmp_path / "data.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(CorpusError, match="unsupported input file"):
        train_tokenizer([odd], tmp_path / "out")
    with pytest.raises(CorpusError, match="not a single string"):
        train_tokenizer(str(tmp_path), tmp_path / "out")
    with pytest.raises(CorpusError, match="no tokenizer.json"):
        train_tokenizer(iter(_small_corpus()), tmp_path / "out", reference_tokenizers=[tmp_path])


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "not valid UTF-8"),
        ("broken.txt.gz", b"\x1f\x8b\x08\x00 this is not gzip data", "cannot read"),
        ("bad.jsonl", b'{"text": "fine"}\n{not json}\n', r"bad.jsonl:2: not a JSON object"),
        ("notext.jsonl", b'{"body": "no text field"}\n', 'string "text" field'),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, name, content, match):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("good text " * 50)
    (corpus / name).write_bytes(content)
    with pytest.raises(CorpusError, match=match) as info:
        train_tokenizer(
            [corpus], tmp_path / "out", vocab_size=300, holdout_fraction=0.0, reference_tokenizers=[]
        )
    assert name in str(info.value)


def test_bad_parameters(tmp_path):
    with pytest.raises(TokenizerError, match="holdout_fraction"):
        train_tokenizer(iter(["x"]), tmp_path / "out", vocab_size=300, holdout_fraction=1.0)
    with pytest.raises(TokenizerError, match="min_frequency"):
        train_tokenizer(iter(["x"]), tmp_path / "out", vocab_size=300, min_frequency=0)
    with pytest.raises(TokenizerError, match="distinct"):
        SpecialTokens(pad="<|eos|>")
    with pytest.raises(TokenizerError, match=r"extra\[1\]"):  # extras were once not checked at all
        SpecialTokens(extra=("<tool>", " "))
    with pytest.raises(TokenizerNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


# ---- command line --------------------------------------------------------------------------------


def _cli(argv):
    """Run the real `lmforge` entry point (its parser, error mapping and exit codes)."""
    from lmforge.cli import main

    return main(argv)


def test_cli_trains_and_prints_summary(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(_small_corpus(20)):
        (corpus / f"doc{i}.txt").write_text(text)
    code = _cli(
        [
            "tokenizer",
            "train",
            "--input",
            str(corpus),
            "--output",
            str(tmp_path / "tok"),
            "--vocab-size",
            "300",
            "--holdout-fraction",
            "0.3",
        ],
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "vocab size 300" in out and "tokens/word" in out and "smollm2" in out
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--input", "/nonexistent/corpus"], "does not exist"),
        (["--input", "CORPUS", "--vocab-size", "100"], "vocab_size=100 is too small"),
        (["--input", "EMPTY"], "corpus is empty"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, extra, message):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    extra = [
        str(tmp_path / "corpus") if a == "CORPUS" else str(tmp_path / "empty") if a == "EMPTY" else a
        for a in extra
    ]
    code = _cli(
        ["tokenizer", "train", "--output", str(tmp_path / "tok"), "--holdout-fraction", "0", *extra],
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lmforge tokenizer: error:") and message in err and "Traceback" not in err


def test_cli_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli(["tokenizer", "train", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--input",
        "--output",
        "--vocab-size",
        "--min-frequency",
        "--holdout-fraction",
        "--reference",
        "--no-reference",
    ):
        assert flag in help_text
