"""Tokenizer stage: train a byte-level BPE tokenizer on a corpus and save it in the Hugging Face format.

Why byte-level BPE: every UTF-8 byte is in the initial alphabet, so any text (code, accents, emoji)
encodes without an unknown token and decodes back to exactly the same string. The output directory
(`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) loads unchanged with
`transformers.AutoTokenizer` / `PreTrainedTokenizerFast` and with `tokenizers.Tokenizer.from_file`,
with identical ids, so the same files travel into the model directory, vLLM and llama.cpp.

A deterministic fraction of the documents (stable hash of the document id) is held out of training;
the fertility report (`fertility.json` + `fertility.md`) measures tokens per word and bytes per token
on those held-out documents for the new tokenizer and, side by side, for reference tokenizers (by
default the bundled SmolLM2 one), so "did a domain tokenizer pay off" is a number, not a guess.

Run it with `lmforge tokenizer train --input data/sample --output out/tokenizer`, or call
`train_tokenizer(...)`; other stages read a tokenizer through `load_tokenizer` / `TokenizerInfo`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmforge.errors import UserError
from lmforge.tokenizer_files import load_tokenizer

# --------------------------------------------------------------------------------------------------
# Constants and errors
# --------------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_DIR = REPO_ROOT / "data" / "reference_tokenizers" / "smollm2"
"""The general-purpose tokenizer the fertility report compares against (present in a source checkout)."""

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".html", ".htm", ".jsonl")
"""File kinds read from input directories; each may also be gzip-compressed (`.gz`)."""

BYTE_ALPHABET_SIZE = 256
CHUNK_CHARS = 1 << 16
"""Text files reach the trainer in ~64k-character pieces cut at line ends: bounded memory for any file
size, and no word is ever split across two pieces."""
EVAL_BATCH_CHARS = 1 << 20
"""Held-out documents are encoded in ~1M-character batches to bound the memory of Encoding objects."""


class TokenizerError(UserError):
    """Base class of the tokenizer stage's user errors (the CLI prints them and exits 2)."""


class CorpusError(TokenizerError):
    """An input path is missing, unreadable, of an unsupported kind, or malformed."""


class EmptyCorpusError(TokenizerError):
    """The inputs hold no text to train on."""


class VocabSizeError(TokenizerError):
    """The requested vocabulary cannot even hold the byte alphabet and the special tokens."""


# --------------------------------------------------------------------------------------------------
# Special tokens and the chat template
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens, in id order (they take ids 0..n-1, before the byte alphabet).

    bos/eos delimit documents in pretraining; pad fills batches; im_start/im_end frame chat turns
    (ChatML), which keeps instruction data compatible with the many tools that speak ChatML.
    """

    bos: str = "<|bos|>"
    eos: str = "<|eos|>"
    pad: str = "<|pad|>"
    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        tokens = self.all()
        names = ("bos", "eos", "pad", "im_start", "im_end", *(f"extra[{i}]" for i in range(len(self.extra))))
        for name, token in zip(names, tokens, strict=True):
            if not isinstance(token, str) or not token.strip():
                raise TokenizerError(f"special token '{name}' must be a non-empty string, got {token!r}")
        duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
        if duplicates:
            raise TokenizerError(f"special tokens must be distinct; repeated: {', '.join(duplicates)}")

    def all(self) -> list[str]:
        return [self.bos, self.eos, self.pad, self.im_start, self.im_end, *self.extra]

    def chat_template(self) -> str:
        """A ChatML Jinja template for `apply_chat_template`: each message becomes
        `<|im_start|>{role}\\n{content}<|im_end|>\\n`; `add_generation_prompt` opens an assistant turn."""
        return (
            "{%- for message in messages %}"
            f"{{{{- '{self.im_start}' + message['role'] + '\\n' + message['content'] + "
            f"'{self.im_end}' + '\\n' }}}}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}"
            f"{{{{- '{self.im_start}assistant\\n' }}}}"
            "{%- endif %}"
        )


# --------------------------------------------------------------------------------------------------
# Reading the corpus (streaming)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One document: a stable id (decides the hold-out split) and a way to stream its text."""

    id: str
    read: Callable[[], Iterator[str]]


def _text_kind(path: Path) -> str | None:
    """The supported kind of a file name ('.txt', '.html', ...) with any '.gz' removed, else None."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in TEXT_SUFFIXES:
        if name.endswith(suffix):
            return ".html" if suffix == ".htm" else suffix
    return None


def _open_text(path: Path):
    # newline="" keeps the file's line endings: the tokenizer should see the text as it is.
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="strict", newline="")
    return open(path, encoding="utf-8", errors="strict", newline="")


@contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """Turn low-level read failures into one CorpusError that names the file."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not valid UTF-8 text ({err.reason}); convert or remove it") from err
    except (OSError, EOFError, zlib.error) as err:  # permissions, bad or truncated gzip, I/O errors
        raise CorpusError(f"cannot read {path}: {err}") from err


def _stream_lines(path: Path) -> Iterator[str]:
    """Yield the file's text in pieces of about CHUNK_CHARS characters, cut at line ends."""
    with _read_errors(path), _open_text(path) as fh:
        buf: list[str] = []
        size = 0
        for line in fh:
            buf.append(line)
            size += len(line)
            if size >= CHUNK_CHARS:
                yield "".join(buf)
                buf, size = [], 0
        if buf:
            yield "".join(buf)


def _read_html(path: Path) -> Iterator[str]:
    """The page's text as curation extracts it (one HTML rule for both stages; imported here because
    the curation package is heavy and only HTML inputs need it)."""
    from lmforge.components.curate.markup import html_to_text

    with _read_errors(path), _open_text(path) as fh:
        yield html_to_text(fh.read())


def _jsonl_documents(path: Path, doc_prefix: str) -> Iterator[Document]:
    """One document per non-empty line; the line must be a JSON object with a string "text" field.
    The document id is its "id" field when present (so a curated dataset's split is reused), else
    file:line."""
    with _read_errors(path), _open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{line_no}: not a JSON object ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CorpusError(f'{path}:{line_no}: expected a JSON object with a string "text" field')
            text = record["text"]
            doc_id = str(record["id"]) if "id" in record else f"{doc_prefix}:{line_no}"
            yield Document(doc_id, lambda text=text: iter((text,)))


def _collect_files(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[Path]]:
    """Expand input paths into (file, document id) pairs in a stable order, plus the files skipped.

    A directory contributes its supported files recursively, with ids relative to it (so the split
    does not depend on where the corpus is stored); a file named explicitly must be supported.
    """
    files: list[tuple[Path, str]] = []
    skipped: list[Path] = []
    for path in paths:
        if not path.exists():
            raise CorpusError(f"input path does not exist: {path}")
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if _text_kind(child) is None:
                    skipped.append(child)
                else:
                    files.append((child, child.relative_to(path).as_posix()))
        elif path.is_file():
            if _text_kind(path) is None:
                raise CorpusError(
                    f"unsupported input file {path}: "
                    f"expected one of {', '.join(TEXT_SUFFIXES)} (optionally .gz)"
                )
            files.append((path, path.name))
        else:
            raise CorpusError(f"input path is neither a file nor a directory: {path}")
    return files, skipped


def _file_documents(files: Sequence[tuple[Path, str]]) -> Iterator[Document]:
    for path, doc_id in files:
        if not os.access(path, os.R_OK):
            raise CorpusError(f"cannot read {path}: permission denied")
        kind = _text_kind(path)
        if kind == ".jsonl":
            yield from _jsonl_documents(path, doc_id)
        elif kind == ".html":
            yield Document(doc_id, lambda path=path: _read_html(path))
        else:
            yield Document(doc_id, lambda path=path: _stream_lines(path))


def _text_documents(texts: Iterable[str]) -> Iterator[Document]:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise CorpusError(f"text #{index} of the input iterator is {type(text).__name__}, not str")
        yield Document(f"text-{index}", lambda text=text: iter((text,)))


def _documents(inputs) -> tuple[Iterator[Document], int, list[Path]]:
    """Documents from a list of paths or from an iterator of texts, with the input file count and the
    files skipped in directories (unsupported kinds), which the report lists rather than dropping silently."""
    if isinstance(inputs, (str, bytes)):
        raise CorpusError(
            "inputs must be a list of paths or an iterator of texts, not a single string "
            "(wrap a path in a list; pass texts as iter([...]))"
        )
    if isinstance(inputs, os.PathLike):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)):
        paths = []
        for item in inputs:
            if not isinstance(item, (str, os.PathLike)):
                raise CorpusError(
                    f"input paths must be str or os.PathLike, got {type(item).__name__} "
                    "(to train on texts, pass an iterator of strings, e.g. iter(texts))"
                )
            paths.append(Path(item))
        if not paths:
            raise EmptyCorpusError("no input paths given")
        files, skipped = _collect_files(paths)
        return _file_documents(files), len(files), skipped
    return _text_documents(inputs), 0, []


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Deterministic document-level split: the same id always lands on the same side, on any machine."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# --------------------------------------------------------------------------------------------------
# Fertility: tokens per word and bytes per token on held-out text
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FertilityRow:
    """One tokenizer's numbers on the held-out sample. Fewer tokens per word (more bytes per token)
    means shorter sequences for the same text: more context per window, less compute per document."""

    name: str
    path: str
    vocab_size: int
    tokens: int
    tokens_per_word: float
    bytes_per_token: float
    chars_per_token: float


@dataclass(frozen=True)
class HeldoutSample:
    texts: list[str]
    documents: int
    bytes: int
    chars: int
    words: int


def _sample(texts: list[str]) -> HeldoutSample:
    return HeldoutSample(
        texts=texts,
        documents=len(texts),
        bytes=sum(len(t.encode("utf-8")) for t in texts),
        chars=sum(len(t) for t in texts),
        words=sum(len(t.split()) for t in texts),
    )


def _vocab_size(tokenizer: Tokenizer) -> int:
    """Rows an embedding table needs: the highest id + 1 (added tokens included)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def count_tokens(tokenizer: Tokenizer, texts: Sequence[str]) -> int:
    """Total tokens of `texts` without special tokens, encoded in bounded-size batches."""
    total, batch, size = 0, [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= EVAL_BATCH_CHARS:
            total += sum(len(e.ids) for e in tokenizer.encode_batch(batch, add_special_tokens=False))
            batch, size = [], 0
    if batch:
        total += sum(len(e.ids) for e in tokenizer.encode_batch(batch, add_special_tokens=False))
    return total


def measure_fertility(name: str, path: str, tokenizer: Tokenizer, sample: HeldoutSample) -> FertilityRow:
    tokens = count_tokens(tokenizer, sample.texts)
    return FertilityRow(
        name=name,
        path=path,
        vocab_size=_vocab_size(tokenizer),
        tokens=tokens,
        tokens_per_word=round(tokens / max(sample.words, 1), 4),
        bytes_per_token=round(sample.bytes / max(tokens, 1), 4),
        chars_per_token=round(sample.chars / max(tokens, 1), 4),
    )


def _fertility_markdown(rows: Sequence[FertilityRow], sample: HeldoutSample, notes: Sequence[str]) -> str:
    lines = [
        "# Tokenizer fertility on held-out documents",
        "",
        f"Held-out sample: {sample.documents} documents, {sample.words:,} words, {sample.bytes:,} bytes "
        f"(UTF-8), {sample.chars:,} characters. Words are whitespace-separated.",
        "",
        "| tokenizer | vocab size | tokens | tokens/word | bytes/token | chars/token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.vocab_size:,} | {r.tokens:,} | {r.tokens_per_word:.3f} | "
            f"{r.bytes_per_token:.3f} | {r.chars_per_token:.3f} |"
        )
    if not rows:
        lines.append("| (no held-out text to measure) | | | | | |")
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusStats:
    input_files: int
    skipped_files: list[str]
    documents: int
    train_documents: int
    train_bytes: int
    heldout_documents: int
    heldout_evaluated_documents: int


@dataclass(frozen=True)
class TokenizerResult:
    """What `train_tokenizer` produced: the files, the corpus counts, timing and the fertility table."""

    output_dir: Path
    tokenizer_json: Path
    tokenizer_config_json: Path
    special_tokens_map_json: Path
    fertility_json: Path
    fertility_md: Path
    vocab_size: int
    requested_vocab_size: int
    train_seconds: float
    corpus: CorpusStats
    fertility: list[FertilityRow]
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics for a tracker (MLflow)."""
        out: dict[str, float] = {
            "vocab_size": self.vocab_size,
            "train_seconds": self.train_seconds,
            "train_documents": self.corpus.train_documents,
            "train_bytes": self.corpus.train_bytes,
            "heldout_documents": self.corpus.heldout_documents,
        }
        for i, row in enumerate(self.fertility):
            prefix = "fertility" if i == 0 else f"reference_{row.name}"
            out[f"{prefix}_tokens_per_word"] = row.tokens_per_word
            out[f"{prefix}_bytes_per_token"] = row.bytes_per_token
        return out


def _check_vocab_size(vocab_size: int, specials: SpecialTokens) -> None:
    minimum = BYTE_ALPHABET_SIZE + len(specials.all())
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise VocabSizeError(f"vocab_size={vocab_size!r} must be an integer (at least {minimum})")
    if vocab_size < minimum:
        raise VocabSizeError(
            f"vocab_size={vocab_size} is too small: it must hold the {BYTE_ALPHABET_SIZE} byte tokens plus "
            f"{len(specials.all())} special tokens, i.e. at least {minimum}"
        )


def _new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE pipeline (no normalizer: text is kept exactly as written)."""
    tok = Tokenizer(models.BPE())  # no unk_token: every byte has a token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    tok.decoder = decoders.ByteLevel()
    return tok


def _resolve_references(reference_tokenizers, notes: list[str]) -> list[Path]:
    """Reference tokenizer directories: the bundled default is optional (an installed wheel has no
    data/ folder: note it and go on); directories the caller names must exist."""
    if reference_tokenizers is None:
        if (DEFAULT_REFERENCE_DIR / "tokenizer.json").is_file():
            return [DEFAULT_REFERENCE_DIR]
        notes.append(
            f"reference tokenizer skipped: {DEFAULT_REFERENCE_DIR / 'tokenizer.json'} not found "
            "(run scripts/extract_reference_tokenizer.py)"
        )
        return []
    refs = []
    for ref in reference_tokenizers:
        ref = Path(ref)
        if not (ref / "tokenizer.json").is_file():
            raise CorpusError(f"reference tokenizer {ref}: no tokenizer.json there")
        refs.append(ref)
    return refs


def train_tokenizer(
    inputs: Sequence[str | os.PathLike] | Iterable[str],
    output_dir: str | os.PathLike,
    vocab_size: int = 16384,
    min_frequency: int = 2,
    special_tokens: SpecialTokens | None = None,
    holdout_fraction: float = 0.1,
    reference_tokenizers: Sequence[str | os.PathLike] | None = None,
    model_max_length: int = 2048,
    holdout_max_chars: int = 8_000_000,
    show_progress: bool = False,
) -> TokenizerResult:
    """Train a byte-level BPE tokenizer and write it, with its fertility report, to `output_dir`.

    inputs: a list of files/directories (directories are read recursively: .txt .md .rst .html .jsonl,
        each optionally .gz; a .jsonl line is one document with a "text" field), or an iterator of
        texts (one document each). A list is always read as paths: pass texts as an iterator.
    vocab_size: total ids including the 256 byte tokens and the special tokens (a small corpus may
        stop short of it: the result reports the real size).
    min_frequency: a pair must occur this often to be merged.
    holdout_fraction: share of documents (by a stable hash of their id) kept out of training and used
        for the fertility report; 0 disables the report.
    reference_tokenizers: directories holding a tokenizer.json to compare with; None = the bundled
        SmolLM2 tokenizer when present; [] = none.
    holdout_max_chars: held-out text kept in memory for the report; documents past it stay out of
        training but are not measured (counted in the result).
    """
    specials = special_tokens or SpecialTokens()
    _check_vocab_size(vocab_size, specials)
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise TokenizerError(f"min_frequency={min_frequency} must be an integer >= 1")
    if not 0.0 <= holdout_fraction < 1.0:
        raise TokenizerError(f"holdout_fraction={holdout_fraction} must be in [0, 1)")
    if model_max_length < 1:
        raise TokenizerError(f"model_max_length={model_max_length} must be >= 1")

    notes: list[str] = []
    references = _resolve_references(reference_tokenizers, notes)
    documents, input_files, skipped = _documents(inputs)
    out = Path(output_dir)

    # One streaming pass: training documents flow into the trainer piece by piece; held-out
    # documents are set aside (up to holdout_max_chars) for the fertility report.
    counts = {
        "documents": 0,
        "train_documents": 0,
        "train_bytes": 0,
        "train_text": False,
        "heldout": 0,
        "heldout_chars": 0,
    }
    heldout_texts: list[str] = []

    def training_text() -> Iterator[str]:
        for doc in documents:
            counts["documents"] += 1
            if is_heldout(doc.id, holdout_fraction):
                counts["heldout"] += 1
                if counts["heldout_chars"] < holdout_max_chars:
                    text = "".join(doc.read())
                    heldout_texts.append(text)
                    counts["heldout_chars"] += len(text)
                continue
            counts["train_documents"] += 1
            for piece in doc.read():
                counts["train_bytes"] += len(piece.encode("utf-8"))
                counts["train_text"] = counts["train_text"] or bool(piece.strip())
                yield piece

    start = time.perf_counter()
    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials.all(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    train_seconds = time.perf_counter() - start

    if not counts["train_text"]:
        if any(t.strip() for t in heldout_texts):
            raise EmptyCorpusError(
                f"all {counts['documents']} documents with text were held out "
                f"(holdout_fraction={holdout_fraction}); "
                "lower the hold-out fraction or add documents"
            )
        where = f"{input_files} input files" if input_files else f"{counts['documents']} input texts"
        extra = f" ({len(skipped)} files of unsupported kinds skipped)" if skipped else ""
        raise EmptyCorpusError(f"the corpus is empty: no text in {where}{extra}")

    actual_vocab = _vocab_size(tokenizer)
    if actual_vocab < vocab_size:
        notes.append(
            f"the corpus supported only {actual_vocab} of the requested {vocab_size} ids "
            f"(no more pairs occur >= {min_frequency} times)"
        )
    if skipped:
        notes.append(f"{len(skipped)} files of unsupported kinds were skipped, e.g. {skipped[0]}")
    heldout_unmeasured = counts["heldout"] - len(heldout_texts)
    if heldout_unmeasured:
        notes.append(
            f"{heldout_unmeasured} held-out documents were not measured (past holdout_max_chars="
            f"{holdout_max_chars}); they were still kept out of training"
        )

    out.mkdir(parents=True, exist_ok=True)
    paths = _save(tokenizer, out, specials, model_max_length)

    # Fertility on the held-out sample, this tokenizer first, then each reference.
    sample = _sample(heldout_texts)
    rows: list[FertilityRow] = []
    if sample.chars:
        rows.append(measure_fertility(f"{out.name or 'tokenizer'} (trained)", str(out), tokenizer, sample))
        for ref in references:
            rows.append(
                measure_fertility(
                    ref.name, str(ref), Tokenizer.from_file(str(ref / "tokenizer.json")), sample
                )
            )
    else:
        notes.append(
            f"no held-out text (holdout_fraction={holdout_fraction}, {counts['documents']} documents): "
            "fertility not measured"
        )

    corpus = CorpusStats(
        input_files=input_files,
        skipped_files=[str(p) for p in skipped],
        documents=counts["documents"],
        train_documents=counts["train_documents"],
        train_bytes=counts["train_bytes"],
        heldout_documents=counts["heldout"],
        heldout_evaluated_documents=len(heldout_texts),
    )
    fertility_json = out / "fertility.json"
    fertility_md = out / "fertility.md"
    report = {
        "heldout": {k: v for k, v in asdict(sample).items() if k != "texts"} | {"fraction": holdout_fraction},
        "tokenizers": [asdict(r) for r in rows],
        "corpus": asdict(corpus),
        "training": {
            "vocab_size": actual_vocab,
            "requested_vocab_size": vocab_size,
            "min_frequency": min_frequency,
            "train_seconds": round(train_seconds, 3),
        },
        "notes": notes,
    }
    fertility_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    fertility_md.write_text(_fertility_markdown(rows, sample, notes), encoding="utf-8")

    return TokenizerResult(
        output_dir=out,
        tokenizer_json=paths["tokenizer"],
        tokenizer_config_json=paths["config"],
        special_tokens_map_json=paths["special_tokens_map"],
        fertility_json=fertility_json,
        fertility_md=fertility_md,
        vocab_size=actual_vocab,
        requested_vocab_size=vocab_size,
        train_seconds=train_seconds,
        corpus=corpus,
        fertility=rows,
        notes=notes,
    )


def _save(tokenizer: Tokenizer, out: Path, specials: SpecialTokens, model_max_length: int) -> dict[str, Path]:
    """Write the Hugging Face tokenizer files. `tokenizer_class: PreTrainedTokenizerFast` plus
    add_bos_token=false keeps transformers from adding tokens the `tokenizers` library would not add,
    so both give identical ids; there is no unk token because no input ever needs one."""
    paths = {
        "tokenizer": out / "tokenizer.json",
        "config": out / "tokenizer_config.json",
        "special_tokens_map": out / "special_tokens_map.json",
    }
    tokenizer.save(str(paths["tokenizer"]))
    extra = [specials.im_start, specials.im_end, *specials.extra]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "pad_token": specials.pad,
        "unk_token": None,
        "additional_special_tokens": extra,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": specials.chat_template(),
    }
    paths["config"].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    special_map = {
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "pad_token": specials.pad,
        "additional_special_tokens": extra,
    }
    paths["special_tokens_map"].write_text(
        json.dumps(special_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return paths


# --------------------------------------------------------------------------------------------------
# Reading a tokenizer back (for the other stages)
# --------------------------------------------------------------------------------------------------


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TokenizerInfo:
    """What other stages need to know about a tokenizer: embedding rows and the special ids.

    Works for tokenizers trained here and for imported Hugging Face ones (e.g. SmolLM2, where bos is
    `<|im_start|>` and eos `<|im_end|>`): the names come from tokenizer_config.json.
    """

    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int | None
    special_tokens: dict[str, int]
    model_max_length: int | None
    chat_template: str | None

    @classmethod
    def from_dir(cls, path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> TokenizerInfo:
        """Read from a directory; `tokenizer`: its tokenizer.json when the caller loaded it already."""
        path = Path(path)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        defaults = SpecialTokens()
        names = {
            "bos": _token_text(config.get("bos_token", defaults.bos)),
            "eos": _token_text(config.get("eos_token", defaults.eos)),
            "pad": _token_text(config.get("pad_token", defaults.pad)),
        }
        ids = {k: (tokenizer.token_to_id(v) if v else None) for k, v in names.items()}
        if ids["eos"] is None:
            raise TokenizerError(
                f"{path}: the tokenizer has no eos token (eos_token={names['eos']!r} "
                "in tokenizer_config.json is not in its vocabulary)"
            )
        specials = {
            t.content: i for i, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special
        }
        max_len = config.get("model_max_length")
        template = config.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():  # transformers >= 4.43 layout
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(
            vocab_size=_vocab_size(tokenizer),
            eos_id=ids["eos"],
            bos_id=ids["bos"],
            pad_id=ids["pad"],
            special_tokens=specials,
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None,
            chat_template=template,
        )
