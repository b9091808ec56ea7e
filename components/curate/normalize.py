"""Bytes -> clean text: binary detection, the decoding policy, and Unicode/whitespace normalization.

Decoding policy (documented in the README; thresholds in `NormalizeConfig`):
  1. a UTF-8 BOM is dropped; a UTF-16/32 BOM selects that codec;
  2. valid UTF-8 is taken as is;
  3. invalid UTF-8 affecting at most `max_invalid_utf8_fraction` of the bytes: the invalid
     sequences are dropped (a few corrupt bytes must not cost the document);
  4. otherwise, a document of at least 70% ASCII bytes that decodes as `legacy_encoding` (default
     cp1252, a superset of Latin-1) is read that way: Western text with accents (café, Straße);
  5. otherwise, with `detect_encoding`, the encoding is detected (charset-normalizer), which is
     reliable for mostly non-ASCII text (Cyrillic cp1251/KOI8-R, Greek cp1253, ...);
  6. otherwise the document is rejected as `undecodable`.
Normalization: newlines unified to "\\n", Unicode NFC (or NFKC), control and invisible format
characters removed (tab and newline kept), exotic spaces turned into " ", trailing spaces stripped,
runs of blank lines capped. Leading indentation is content (code samples) and is kept.
"""

from __future__ import annotations

import codecs
import re
import unicodedata

from lmforge.components.curate.config import NormalizeConfig

_SNIFF = 8192
_TEXT_CONTROLS = b"\t\n\r\f\b\x1b"  # control bytes that do occur in real text files
_CONTROL_BYTES = bytes(b for b in range(32) if b not in _TEXT_CONTROLS) + b"\x7f"
_NOT_CONTROL = bytes(b for b in range(256) if b not in _CONTROL_BYTES)
_HIGH_BYTES = bytes(range(128, 256))
LEGACY_ASCII_SHARE = 0.7


def is_binary(data: bytes, control_fraction: float) -> bool:
    """NUL bytes, or too many other control bytes, in the first 8 KiB (UTF-16/32 with a BOM is text)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return False
    head = data[:_SNIFF]
    if not head:
        return False
    if b"\x00" in head:
        return True
    controls = len(head.translate(None, _NOT_CONTROL))
    return controls / len(head) > control_fraction


def decode(data: bytes, cfg: NormalizeConfig) -> tuple[str | None, str]:
    """(text, how) where how is 'utf-8', 'utf-8-repaired', 'utf-16'/'utf-32', the legacy codec, or
    'detected:<codec>';
    text is None when the bytes are undecodable under the policy."""
    for bom, codec in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if data.startswith(bom):
            try:
                return data.decode(codec), codec
            except UnicodeDecodeError:
                return None, codec
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    repaired = data.decode("utf-8", errors="replace")
    invalid = repaired.count("\ufffd") - data.count("\ufffd".encode())
    if invalid <= cfg.max_invalid_utf8_fraction * len(data):
        return repaired.replace("\ufffd", ""), "utf-8-repaired"
    if cfg.legacy_encoding and len(data.translate(None, _HIGH_BYTES)) >= LEGACY_ASCII_SHARE * len(data):
        try:
            return data.decode(cfg.legacy_encoding), cfg.legacy_encoding
        except UnicodeDecodeError:
            pass
    if cfg.detect_encoding:
        from charset_normalizer import from_bytes

        best = from_bytes(data).best()
        if best is not None and best.encoding not in ("utf_8", "utf-8"):
            return str(best), f"detected:{best.encoding}"
    return None, "undecodable"


def _build_delete_table() -> dict[int, None | str]:
    table: dict[int, None | str] = {}
    for cp in list(range(0, 32)) + list(range(0x7F, 0xA0)):
        if cp not in (0x09, 0x0A):
            table[cp] = None  # C0/C1 controls (\r is unified to \n before this runs)
    for cp in (0x00AD, 0x200B, 0x2060, 0xFEFF, 0xFFFD, 0xFFFE, 0xFFFF):
        table[cp] = None  # soft hyphen, zero-width space, word joiner, BOM, replacement char, non-chars
    for cp in (0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000):
        table[cp] = " "  # Unicode space separators
    return table


_TRANSLATE = _build_delete_table()
_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85]")


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    text = _NEWLINES.sub("\n", text)
    text = unicodedata.normalize(cfg.unicode_form, text)
    text = text.translate(_TRANSLATE)
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))  # linear, unlike a regex
    max_blank = cfg.max_consecutive_blank_lines
    text = re.sub(f"\n{{{max_blank + 2},}}", "\n" * (max_blank + 1), text)
    return text.strip("\n") if text.strip() else ""
