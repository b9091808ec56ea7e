"""The curation config: one dataclass per concern, each validated in `__post_init__`.

Load from YAML with `lmforge.config.load(CurateConfig, "configs/curate.yaml", ["filters.min_words=10"])`.
Every threshold can be switched off with `null` (None) where that makes sense. Defaults are tuned
for technical documentation (the demo domain): code samples and reST markup must not be rejected
as "not prose", so the character-level thresholds are looser than Gopher's web-text values.
"""

from __future__ import annotations

import codecs
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.model.config import ConfigError

KNOWN_EXTENSIONS = {
    ".txt": "text",
    ".md": "text",
    ".rst": "text",
    ".html": "html",
    ".htm": "html",
    ".jsonl": "jsonl",
}
MiB = 1 << 20


def _check_fraction(section: str, name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(
            f"{name} must be a number in [0, 1]{' or null' if allow_none else ''}, got {value!r}"
        )


def _check_positive(
    section: str, name: str, value: Any, *, allow_none: bool = False, allow_zero: bool = False
) -> None:
    if value is None and allow_none:
        return
    low = 0 if allow_zero else 1
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
        where = name  # pydantic prefixes the section (e.g. "filters: min_words ...")
        raise ConfigError(
            f"{where} must be a number >= {low}{' or null' if allow_none else ''}, got {value!r}"
        )


@dataclass
class InputConfig:
    """Which files are documents and how they are read."""

    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".rst", ".html", ".htm", ".jsonl"])
    text_field: str = "text"  # JSONL: the field holding the document text
    id_field: str | None = "id"  # JSONL: a field holding a stable document id (else file#byte-offset)
    max_document_bytes: int = 16 * MiB  # larger documents are counted as `oversized`, never loaded
    # Glob patterns of files to leave out (licences, indexes, ...): a pattern without "/" matches a
    # file's name at any depth ("LICENSE*"), one with "/" its path inside the input ("howto/*.txt").
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [e for e in self.extensions if e not in KNOWN_EXTENSIONS]
        if unknown:
            raise ConfigError(
                f"extensions has unsupported {unknown}; known: {sorted(KNOWN_EXTENSIONS)} "
                "(each may also be gzip'd, e.g. .jsonl.gz)"
            )
        if not self.extensions:
            raise ConfigError("extensions must list at least one extension")
        if not self.text_field:
            raise ConfigError("text_field must be a non-empty field name")
        _check_positive("input", "max_document_bytes", self.max_document_bytes)
        if any(not isinstance(p, str) or not p.strip() for p in self.exclude):
            raise ConfigError(f"exclude must hold non-empty glob patterns, got {self.exclude!r}")


@dataclass
class NormalizeConfig:
    """Decoding policy and text cleanup (see components/curate/normalize.py)."""

    unicode_form: Literal["NFC", "NFKC"] = "NFC"
    # Bytes that are not valid UTF-8: if at most this fraction of a document's bytes is invalid, the
    # invalid sequences are dropped (a few corrupt bytes); otherwise a mostly-ASCII document is read as
    # `legacy_encoding` (the usual Western legacy code page; statistical detection confuses it with
    # e.g. mac_latin2 on short texts), anything else is detected (if detect_encoding) or rejected as
    # `undecodable`.
    max_invalid_utf8_fraction: float = 0.001
    legacy_encoding: str | None = "cp1252"
    detect_encoding: bool = True
    # A file whose first 8 KiB holds a NUL byte, or more than this fraction of other control bytes,
    # is `binary`.
    binary_control_fraction: float = 0.05
    max_consecutive_blank_lines: int = 1

    def __post_init__(self) -> None:
        _check_fraction(
            "normalize", "max_invalid_utf8_fraction", self.max_invalid_utf8_fraction, allow_none=False
        )
        if self.legacy_encoding is not None:
            try:
                codecs.lookup(self.legacy_encoding)
            except LookupError:
                raise ConfigError(
                    f"legacy_encoding {self.legacy_encoding!r} is not a codec Python knows"
                ) from None
        _check_fraction(
            "normalize", "binary_control_fraction", self.binary_control_fraction, allow_none=False
        )
        _check_positive(
            "normalize", "max_consecutive_blank_lines", self.max_consecutive_blank_lines, allow_zero=True
        )


@dataclass
class FilterConfig:
    """Gopher/C4-style quality heuristics; a document failing one is rejected under that reason."""

    min_words: int | None = 20
    max_words: int | None = 200_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 12.0
    min_alpha_fraction: float | None = 0.5  # alphabetic characters / non-whitespace characters
    max_symbol_word_ratio: float | None = 0.1  # ('#' runs + '...'/'…') per word
    max_duplicate_line_fraction: float | None = 0.3  # repeated non-blank lines / non-blank lines
    max_bullet_line_fraction: float | None = 0.9  # lines starting with a bullet
    max_ellipsis_line_fraction: float | None = 0.3  # lines ending in '...' or '…'
    bad_phrases: list[str] = field(default_factory=lambda: ["lorem ipsum"])  # C4: any occurrence rejects
    language: Literal["en"] | None = "en"  # cheap hint: stop-word presence (Gopher); null disables
    min_stop_words: int = 2  # distinct stop words of `language` a document must contain

    def __post_init__(self) -> None:
        for name in ("min_words", "max_words", "min_mean_word_length", "max_mean_word_length"):
            _check_positive("filters", name, getattr(self, name), allow_none=True, allow_zero=True)
        for name in (
            "min_alpha_fraction",
            "max_symbol_word_ratio",
            "max_duplicate_line_fraction",
            "max_bullet_line_fraction",
            "max_ellipsis_line_fraction",
        ):
            _check_fraction("filters", name, getattr(self, name))
        for lo, hi in (("min_words", "max_words"), ("min_mean_word_length", "max_mean_word_length")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ConfigError(f"{lo} ({a}) must not exceed {hi} ({b})")
        _check_positive("filters", "min_stop_words", self.min_stop_words, allow_zero=True)
        if any(not p.strip() for p in self.bad_phrases):
            raise ConfigError("bad_phrases must not contain empty phrases")


@dataclass
class DedupConfig:
    exact: bool = True  # drop documents whose whitespace-normalised text was already kept
    near: bool = True  # drop documents too similar to a kept one (MinHash + LSH)
    jaccard_threshold: float = (
        0.8  # estimated Jaccard similarity of word shingles at which a doc is a near-duplicate
    )
    num_perm: int = 128  # MinHash permutations (more = more precise estimates, more memory)
    shingle_words: int = 5  # words per shingle
    seed: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.jaccard_threshold, (int, float)) or not 0.0 < self.jaccard_threshold < 1.0:
            raise ConfigError(f"jaccard_threshold must be in (0, 1), got {self.jaccard_threshold!r}")
        if self.num_perm < 16:
            raise ConfigError(f"num_perm must be >= 16, got {self.num_perm}")
        _check_positive("dedup", "shingle_words", self.shingle_words)
        _check_positive("dedup", "seed", self.seed, allow_zero=True)


@dataclass
class PiiConfig:
    """Which kinds of personal data / secrets are replaced by typed placeholders."""

    email: bool = True  # -> [EMAIL]
    phone: bool = True  # -> [PHONE]
    ip_address: bool = True  # -> [IP_ADDRESS] (loopback/unspecified addresses are kept)
    secret: bool = True  # API keys, tokens, passwords in assignments -> [SECRET]
    private_key: bool = True  # PEM private-key blocks -> [PRIVATE_KEY]


@dataclass
class SplitConfig:
    """Document-level split by a stable hash of (salt, document id); train gets the rest."""

    validation: float = 0.05
    test: float = 0.05
    salt: str = "lmforge-split-v1"

    def __post_init__(self) -> None:
        _check_fraction("split", "validation", self.validation, allow_none=False)
        _check_fraction("split", "test", self.test, allow_none=False)
        if self.validation + self.test >= 1.0:
            raise ConfigError(
                f"validation + test must be < 1 (train needs a share), got {self.validation + self.test}"
            )


@dataclass
class S3Config:
    """S3/MinIO access for s3:// inputs; unset fields come from the environment."""

    endpoint: str | None = None  # host:port or URL; default $LMFORGE_S3_ENDPOINT
    access_key: str | None = None  # default $AWS_ACCESS_KEY_ID
    secret_key: str | None = None  # default $AWS_SECRET_ACCESS_KEY
    region: str | None = None  # default $AWS_REGION / $AWS_DEFAULT_REGION / us-east-1
    secure: bool | None = None  # default: https unless the endpoint says http://


@dataclass
class CurateConfig:
    input: InputConfig = field(default_factory=InputConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    s3: S3Config = field(default_factory=S3Config)
    num_workers: int | None = None  # processes; null = all cores, but at most one per 8 MiB of input
    task_bytes: int = 1 * MiB  # input bytes per work unit (bounds memory in flight: ~2 units per worker)
    shard_bytes: int = 128 * MiB  # output JSONL shard size

    def __post_init__(self) -> None:
        _check_positive("", "num_workers", self.num_workers, allow_none=True)
        _check_positive("", "task_bytes", self.task_bytes)
        _check_positive("", "shard_bytes", self.shard_bytes)


def public_dict(cfg: CurateConfig) -> dict[str, Any]:
    """The config as recorded in the datacard: credentials masked."""
    data = dataclasses.asdict(cfg)
    for key in ("access_key", "secret_key"):
        if data["s3"][key]:
            data["s3"][key] = "***"
    return data
