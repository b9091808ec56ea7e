"""PII and secret redaction: matches are replaced by typed placeholders and counted per type.

Placeholders: [PRIVATE_KEY] [SECRET] [EMAIL] [IP_ADDRESS] [PHONE]. Patterns run in that order, so a
key block is removed whole before its base64 lines could look like anything else.

Regular expressions rather than an NER model: the targets here have a fixed shape (an address, a
dotted quad, a PEM block, a provider's key prefix), regexes are exact about what they remove, need no
model download and run at corpus speed. Candidates are validated where a library can (IP addresses
via `ipaddress`; phone numbers by digit count) to keep version strings and dates out.
Not covered: names, postal addresses, national ID numbers (need NER or locale rules).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from lmforge.components.curate.config import PiiConfig

PII_TYPES = ("private_key", "secret", "email", "ip_address", "phone")
PLACEHOLDERS = {t: f"[{t.upper()}]" for t in PII_TYPES}

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r".*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
    re.DOTALL,
)
# Provider-shaped tokens (recognisable by prefix) and values assigned to secret-sounding names.
_SECRET_TOKENS = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{40,255}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9-]{10,250}"  # Slack
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API keys
    r"|sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"  # OpenAI / Anthropic style
    r"|(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}"  # Stripe
    r"|glpat-[0-9A-Za-z_\-]{20}"  # GitLab
    r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"  # JWT
    r")(?![A-Za-z0-9])"
)
# A value assigned to a secret-sounding name: `api_key = "..."`, `password: ...`. Found in two steps
# (any long assigned value, then the name just before it): one case-insensitive alternation tried at
# every position was 10x slower and dominated curation time.
_ASSIGNED_VALUE = re.compile(r"""[:=][ \t]*["']?(?P<value>[A-Za-z0-9_\-+/=.~]{12,})""")
_SECRET_NAME = re.compile(
    r"(?i)(?:api[_-]?key|secret(?:[_-]?access)?[_-]?key|secret|token|passw(?:or)?d|pwd"
    r"|auth[_-]?key|private[_-]?key|access[_-]?key)"
    r"""\b["']?[ \t]*\Z"""
)
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
# Not part of a longer dotted run (a version 1.2.3.4.5, a name 10.0.0.1.log); a full stop that ends
# the sentence ("from host 203.0.113.7.") or an ellipsis may follow.
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\w)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"
)
_DATE_PREFIX = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}(?!\d)")
_PHONE = re.compile(
    r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?"  # optional +country code, (area code)
    r"\d{2,4}(?P<sep>[ .-])\d{2,4}(?:(?P=sep)\d{2,4}){0,3}"  # digit groups with ONE kind of separator
    r"(?![\w-]|\.\d)"
)


def _is_public_ip(candidate: str) -> bool:
    """Addresses that identify a machine; loopback/unspecified/link-local ones identify nobody."""
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return not (
        ip.is_loopback
        or ip.is_unspecified
        or ip.is_link_local
        or ip.is_multicast
        or (ip.version == 4 and str(ip) == "255.255.255.255")
    )


def _looks_like_ipv6(candidate: str) -> bool:
    # At least three groups: "1::" or "be::" (reST's "::" after a word) are valid addresses but not PII.
    return sum(1 for g in candidate.split(":") if g) >= 3 and _is_public_ip(candidate)


def _looks_like_phone(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    if not 9 <= digits <= 15 or _DATE_PREFIX.match(candidate):
        return False
    if "+" in candidate or "(" in candidate:
        return True
    # Groups separated only by spaces are more often a table row or a list of numbers.
    return "-" in candidate or "." in candidate


def _sub(
    pattern: re.Pattern[str], text: str, placeholder: str, keep: Callable[[str], bool] | None = None
) -> tuple[str, int]:
    count = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal count
        if keep is not None and not keep(m.group(0)):
            return m.group(0)
        count += 1
        return placeholder

    return pattern.sub(repl, text), count


def redact(text: str, cfg: PiiConfig) -> tuple[str, dict[str, int]]:
    """(redacted text, replacements per PII type)."""
    counts = dict.fromkeys(PII_TYPES, 0)
    if cfg.private_key and "PRIVATE KEY" in text:
        text, counts["private_key"] = _sub(_PRIVATE_KEY, text, PLACEHOLDERS["private_key"])
    if cfg.secret:
        text, n = _sub(_SECRET_TOKENS, text, PLACEHOLDERS["secret"])

        def assignment(m: re.Match[str]) -> str:
            nonlocal n
            value = m.group("value")
            if not _SECRET_NAME.search(m.string, max(0, m.start() - 64), m.start()):
                return m.group(0)
            if not (any(c.isdigit() for c in value) and any(c.isalpha() for c in value)):
                return m.group(0)  # `password = changeme_please`: a word, not a key
            n += 1
            return m.group(0)[: m.start("value") - m.start()] + PLACEHOLDERS["secret"]

        text = _ASSIGNED_VALUE.sub(assignment, text)
        counts["secret"] = n
    if cfg.email and "@" in text:
        text, counts["email"] = _sub(_EMAIL, text, PLACEHOLDERS["email"])
    if cfg.ip_address:
        text, n4 = _sub(_IPV4, text, PLACEHOLDERS["ip_address"], _is_public_ip)
        n6 = 0
        if "::" in text or text.count(":") >= 7:
            text, n6 = _sub(_IPV6, text, PLACEHOLDERS["ip_address"], _looks_like_ipv6)
        counts["ip_address"] = n4 + n6
    if cfg.phone:
        text, counts["phone"] = _sub(_PHONE, text, PLACEHOLDERS["phone"], _looks_like_phone)
    return text, counts
