"""The curation building blocks one by one: decoding policy, normalization, markup, quality filters,
PII patterns (including what must NOT be redacted), deduplication, split assignment, config."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from lmforge.components.curate.config import (
    CurateConfig,
    DedupConfig,
    FilterConfig,
    NormalizeConfig,
    PiiConfig,
    SplitConfig,
)
from lmforge.components.curate.dedup import Deduplicator, Signer, exact_key
from lmforge.components.curate.filters import quality_reason
from lmforge.components.curate.markup import html_to_text
from lmforge.components.curate.normalize import decode, is_binary, normalize_text
from lmforge.components.curate.pii import PII_TYPES, redact
from lmforge.components.curate.split import assign_split
from lmforge.config import load
from lmforge.model.config import ConfigError

NORM = NormalizeConfig()
PROSE = (
    "The scheduler retries a failed job with an exponential backoff, and the operator can inspect "
    "the history of every attempt in the web console that comes with the platform. "
)


# ---- decoding and normalization ------------------------------------------------------------------
def test_decoding_policy() -> None:
    assert decode("naïve café".encode(), NORM) == ("naïve café", "utf-8")
    assert decode(b"\xef\xbb\xbfhello", NORM) == ("hello", "utf-8")  # UTF-8 BOM dropped
    assert decode("hé".encode("utf-16"), NORM) == ("hé", "utf-16")
    # One corrupt byte in 2,000: dropped, the document survives.
    text, how = decode(PROSE.encode() * 10 + b"\xff" + PROSE.encode() * 10, NORM)
    assert how == "utf-8-repaired" and "\ufffd" not in text and text.count("scheduler") == 20
    # A legacy 8-bit encoding: detected, accents intact.
    latin = ("Le fichier de configuration a été créé à côté du répertoire; déjà vérifié. " * 6).encode(
        "cp1252"
    )
    text, how = decode(latin, NORM)
    assert how == "cp1252" and "été créé à côté du répertoire" in text
    # Mostly non-ASCII legacy text: detected.
    russian = ("Пользователь должен создать файл конфигурации и перезапустить сервер. " * 4).encode("cp1251")
    text, how = decode(russian, NORM)
    assert how == "detected:cp1251" and text.startswith("Пользователь должен")
    # With neither fallback: rejected rather than silently mangled.
    assert decode(latin, NormalizeConfig(legacy_encoding=None, detect_encoding=False)) == (
        None,
        "undecodable",
    )


def test_binary_detection() -> None:
    assert is_binary(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 0.05)
    assert is_binary(bytes(range(1, 32)) * 10 + b"text", 0.05)
    assert not is_binary(PROSE.encode() + b"\tcol\r\n\x0c", 0.05)
    assert not is_binary("hé".encode("utf-16"), 0.05)  # NULs of UTF-16 are text when a BOM says so


def test_normalize_text() -> None:
    raw = "\n\n  Title\r\n\r\n\r\n\r\ncafe\u0301\u00a0bar\u200b\x07 \t\n    indented code()\n\u2028end  \n\n"
    assert normalize_text(raw, NORM) == "  Title\n\ncafé bar\n    indented code()\n\nend"
    assert normalize_text(" \n\t\u200b\n", NORM) == ""
    assert normalize_text("ﬁle", NormalizeConfig(unicode_form="NFKC")) == "file"
    assert normalize_text("a\n\n\n\nb", NormalizeConfig(max_consecutive_blank_lines=0)) == "a\nb"


def test_html_to_text_is_tolerant() -> None:
    text = html_to_text("<div><p>Unclosed <b>bold<p>Second &amp; last<script>x = 1 < 2")
    assert "Unclosed bold" in text and "Second & last" in text and "x = 1" not in text
    assert (
        html_to_text("<head><title>T</title><p>Body without closing head")
        == "T\n\nBody without closing head"  # laid out like curated text: no blank line at the start
    )


# ---- quality filters ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (PROSE, None),
        ("The end of the story.", "too_few_words"),
        ("a b c d e f g h i j k l m n o p q r s t u v w x y z of the and", "mean_word_length"),
        ("The " + " ".join(["incomprehensibilities"] * 30) + " of the", "mean_word_length"),
        ("The value of the and " + " ".join(f"{i:05d}" for i in range(40)), "alpha_fraction"),
        (PROSE + " ".join(["#tag ... #more"] * 8), "symbol_ratio"),
        ("\n".join(["The same line of the log with repeated content."] * 5 + [PROSE]), "duplicate_lines"),
        ("\n".join(f"- bullet point number {i} of the list" for i in range(10)), "bullet_lines"),
        (
            "\n".join(f"And then the long story of item {i} went on and on and on..." for i in range(10)),
            "ellipsis_lines",
        ),
        (PROSE + "Lorem Ipsum dolor sit amet.", "bad_phrase"),
        (
            "Die Dokumentation beschreibt ausführlich, wie man Module installiert und eigene Pakete "
            "veröffentlicht; viele Beispiele lassen sich direkt im Interpreter ausprobieren.",
            "language",
        ),
    ],
)
def test_quality_reasons(text: str, reason: str | None) -> None:
    assert quality_reason(text, FilterConfig()) == reason


def test_filters_can_be_switched_off() -> None:
    off = FilterConfig(min_words=None, min_mean_word_length=None, language=None)
    assert quality_reason("Hello world.", off) is None
    assert quality_reason("Hello world.", FilterConfig(min_words=1)) == "language"


# ---- PII ------------------------------------------------------------------------------------------
def test_each_pii_type_is_replaced_and_counted() -> None:
    text = (
        "Mail jane.doe+ops@mail.example.co.uk, call +44 20 7946 0958 or (555) 123-4567 or 415.555.0100; "
        "hosts 203.0.113.7 and fe80::1 and 2001:db8:85a3::8a2e:370:7334. token = ghp_" + "a1" * 18 + " and "
        "password: Sup3rS3cretPassw0rd and sk-proj-"
        + "x9" * 12
        + "\n-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----"
    )
    out, counts = redact(text, PiiConfig())
    assert counts == {"private_key": 1, "secret": 3, "email": 1, "ip_address": 2, "phone": 3}
    assert out.startswith(
        "Mail [EMAIL], call [PHONE] or [PHONE] or [PHONE]; hosts [IP_ADDRESS] and fe80::1 and [IP_ADDRESS]."
    )
    assert "password: [SECRET]" in out and out.endswith("[PRIVATE_KEY]")


def test_things_that_only_look_like_pii_are_kept() -> None:
    text = (
        "Python 3.11.4 on 127.0.0.1:8000 and 0.0.0.0; released 2023-06-06 14:05; see section 1.2.3; "
        "a table: 100 200 300 400 500; the C++ std::map and reST's example:: block; 12:30:45; "
        "ISBN 978 3 16 148410 0; password = changeme"
    )
    out, counts = redact(text, PiiConfig())
    assert out == text and sum(counts.values()) == 0


PII_SAMPLES = {
    "ip_address": "203.0.113.7",
    "email": "jane.doe+ops@mail.example.co.uk",
    "phone": "+44 20 7946 0958",
}
PII_CONTEXTS = {
    "sentence end": "It came from {}.",
    "ellipsis": "It came from {}...",
    "exclamation": "Write to {}!",
    "question": "Was it {}?",
    "comma": "From {}, then elsewhere.",
    "parentheses": "The host ({}) answered.",
    "parentheses at sentence end": "It answered (from {}).",
    "double quotes": 'He said "{}" twice.',
    "single quotes": "He said '{}'.",
    "typographic quotes": "He said \u201c{}\u201d.",
    "line end": "first line {}.\nsecond line",
}


@pytest.mark.parametrize("context", PII_CONTEXTS.values(), ids=PII_CONTEXTS.keys())
@pytest.mark.parametrize("kind", PII_SAMPLES)
def test_pii_is_redacted_next_to_punctuation(kind: str, context: str) -> None:
    """Regression: an IPv4 address directly followed by a full stop was kept."""
    out, counts = redact(context.format(PII_SAMPLES[kind]), PiiConfig())
    assert out == context.format(f"[{kind.upper()}]")
    assert counts[kind] == 1 and sum(counts.values()) == 1


@pytest.mark.parametrize("text", ["Python 1.2.3.4.5 is out", "see 10.0.0.1.log", "version v203.0.113.7"])
def test_dotted_runs_that_are_not_addresses_are_kept(text: str) -> None:
    assert redact(text, PiiConfig()) == (text, dict.fromkeys(PII_TYPES, 0))


def test_pii_types_can_be_disabled() -> None:
    out, counts = redact("write to a@b.io from 8.8.8.8", PiiConfig(email=False))
    assert out == "write to a@b.io from [IP_ADDRESS]" and counts["email"] == 0


# ---- dedup ----------------------------------------------------------------------------------------
def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        rng.choice(["queue", "worker", "retry", "backoff", "node", "cluster", "pod", "job", "log", "disk"])
        + str(rng.randint(0, 50))
        for _ in range(n)
    ]


def test_exact_and_near_duplicates() -> None:
    cfg = DedupConfig()
    signer, dedup = Signer(cfg), Deduplicator(cfg)
    base = _words(400, 1)
    check = lambda text: dedup.check(exact_key(text), signer.signature(text))  # noqa: E731
    assert check(" ".join(base)) is None
    assert check("  " + "\n".join(base) + "\n") == "exact_duplicate"  # whitespace does not matter
    near = base.copy()
    near[200] = "CHANGED"  # one word: ~1% of shingles differ
    assert check(" ".join(near)) == "near_duplicate"
    half = base[:200] + _words(200, 2)  # Jaccard ~0.33: a different document
    assert check(" ".join(half)) is None
    assert check(" ".join(_words(400, 3))) is None


def test_jaccard_threshold_decides() -> None:
    base = _words(300, 4)
    variant = base.copy()
    for i in range(0, 300, 25):
        variant[i] = "EDIT"  # 12 edits x 5 shingles: Jaccard ~0.67
    for threshold, expected in ((0.9, None), (0.5, "near_duplicate")):
        cfg = DedupConfig(jaccard_threshold=threshold)
        signer, dedup = Signer(cfg), Deduplicator(cfg)
        dedup.check(exact_key(" ".join(base)), signer.signature(" ".join(base)))
        assert dedup.check(exact_key(" ".join(variant)), signer.signature(" ".join(variant))) == expected


def test_dedup_can_be_switched_off() -> None:
    dedup = Deduplicator(DedupConfig(exact=False, near=False))
    assert dedup.check(exact_key("same"), None) is None and dedup.check(exact_key("same"), None) is None


# ---- split ----------------------------------------------------------------------------------------
def test_split_assignment_is_stable_and_proportional() -> None:
    cfg = SplitConfig(validation=0.1, test=0.2)
    ids = [f"docs/file-{i}.md" for i in range(20000)]
    first = [assign_split(i, cfg) for i in ids]
    assert first == [assign_split(i, cfg) for i in ids]
    share = Counter(first)
    assert abs(share["validation"] / 20000 - 0.1) < 0.01 and abs(share["test"] / 20000 - 0.2) < 0.01
    other = [assign_split(i, SplitConfig(validation=0.1, test=0.2, salt="other")) for i in ids]
    assert sum(a != b for a, b in zip(first, other, strict=True)) > 5000  # a new salt draws a new split


# ---- config ---------------------------------------------------------------------------------------
def test_yaml_matches_the_defaults_and_errors_name_the_field(repo_root: Path) -> None:
    assert load(CurateConfig, repo_root / "configs" / "curate.yaml") == CurateConfig()
    cfg = load(
        CurateConfig, repo_root / "configs" / "curate.yaml", ["filters.min_words=5", "filters.language=null"]
    )
    assert cfg.filters.min_words == 5 and cfg.filters.language is None
    for override, field in (
        ("filters.min_alpha_fraction=1.5", "min_alpha_fraction"),
        ("split.test=0.99", "validation + test"),
        ("input.extensions=[.pdf]", "extensions"),
        ("dedup.num_perm=4", "num_perm"),
        ("filters.language=fr", "filters.language"),
        ("pii.emails=false", "pii.emails"),
    ):
        with pytest.raises(ConfigError, match=field.replace("+", r"\+")):
            load(CurateConfig, None, [override])
