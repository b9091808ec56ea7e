"""Quality heuristics after Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020).

`quality_reason(text, cfg)` returns the first failing check's reason (in the fixed order of
`FILTER_REASONS`) or None. Each threshold is a `FilterConfig` field; None switches a check off.
Words are whitespace-separated tokens, lines are non-blank lines.
"""

from __future__ import annotations

import re

from lmforge.components.curate.config import FilterConfig

FILTER_REASONS = (
    "too_few_words",
    "too_many_words",
    "mean_word_length",
    "alpha_fraction",
    "symbol_ratio",
    "duplicate_lines",
    "bullet_lines",
    "ellipsis_lines",
    "bad_phrase",
    "language",
)

# Gopher's stop-word rule: a real English document contains at least two of these.
STOP_WORDS = {"en": frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})}

_HASH_RUNS = re.compile(r"#+")
_ELLIPSES = re.compile(r"\.\.\.|…")
_BULLETS = ("•", "‣", "◦", "▪", "●", "- ", "* ", "– ")
_WORD_CHARS = re.compile(r"[^\W\d_]+")


def quality_reason(text: str, cfg: FilterConfig) -> str | None:
    words = text.split()
    n = len(words)
    if cfg.min_words is not None and n < cfg.min_words:
        return "too_few_words"
    if cfg.max_words is not None and n > cfg.max_words:
        return "too_many_words"
    if n == 0:
        return "too_few_words"
    mean_len = sum(map(len, words)) / n
    if (cfg.min_mean_word_length is not None and mean_len < cfg.min_mean_word_length) or (
        cfg.max_mean_word_length is not None and mean_len > cfg.max_mean_word_length
    ):
        return "mean_word_length"
    if cfg.min_alpha_fraction is not None:
        non_space = sum(map(len, words))
        alpha = sum(len(m) for m in _WORD_CHARS.findall(text))
        if alpha / non_space < cfg.min_alpha_fraction:
            return "alpha_fraction"
    if cfg.max_symbol_word_ratio is not None:
        symbols = len(_HASH_RUNS.findall(text)) + len(_ELLIPSES.findall(text))
        if symbols / n > cfg.max_symbol_word_ratio:
            return "symbol_ratio"
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if cfg.max_duplicate_line_fraction is not None and lines:
        if 1 - len(set(lines)) / len(lines) > cfg.max_duplicate_line_fraction:
            return "duplicate_lines"
    if cfg.max_bullet_line_fraction is not None and lines:
        if sum(line.startswith(_BULLETS) for line in lines) / len(lines) > cfg.max_bullet_line_fraction:
            return "bullet_lines"
    if cfg.max_ellipsis_line_fraction is not None and lines:
        if sum(line.endswith(("...", "…")) for line in lines) / len(lines) > cfg.max_ellipsis_line_fraction:
            return "ellipsis_lines"
    if cfg.bad_phrases:
        folded = text.casefold()
        if any(p.casefold() in folded for p in cfg.bad_phrases):
            return "bad_phrase"
    if cfg.language is not None and cfg.min_stop_words:
        stops = STOP_WORDS[cfg.language]
        found: set[str] = set()
        for w in words:
            w = w.strip(".,;:!?\"'()[]").lower()
            if w in stops:
                found.add(w)
                if len(found) >= cfg.min_stop_words:
                    break
        else:
            return "language"
    return None
