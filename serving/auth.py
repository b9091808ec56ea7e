"""API keys and per-key rate limits for the HTTP API.

Keys come from an environment variable (comma-separated) and/or a mounted secret file (one per
line, `#` comments), read inside the router replica, so they never pass through Serve's config,
the command line or logs. A key is only ever compared in constant time and referred to by a short
fingerprint (`key-1a2b3c4d`, a SHA-256 prefix), which is what logs and rate limiting use.

Secure default: with no key configured the API is open only when bound to a loopback address;
another address without keys needs an explicit `allow_unauthenticated`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError
from lmforge.serving.config import ServeConfig, is_loopback


class AuthConfigError(UserError):
    """The key sources are unreadable, or the server would be open on a non-loopback address."""


def fingerprint(key: str) -> str:
    """A stable, non-reversible name for a key (safe for logs and metrics)."""
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def read_keys(env_var: str, file: str | os.PathLike | None) -> list[str]:
    """Keys from `$env_var` (comma-separated) and `file` (one per line); order kept, duplicates dropped."""
    keys: list[str] = []
    for raw in os.environ.get(env_var, "").split(","):
        keys.append(raw.strip())
    if file is not None:
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise AuthConfigError(f"cannot read the API key file {path}: {err.strerror or err}") from err
        for line in text.splitlines():
            keys.append(line.split("#", 1)[0].strip())
    unique: list[str] = []
    for key in keys:
        if key and key not in unique:
            if any(c.isspace() for c in key):
                raise AuthConfigError(
                    f"an API key from ${env_var} or {file} contains whitespace "
                    f"({fingerprint(key)}); keys are single tokens"
                )
            unique.append(key)
    return unique


@dataclass(frozen=True)
class Principal:
    """Who made a request: a key fingerprint (or "anonymous" on an open server) and whether admin."""

    key_id: str
    admin: bool = False


class AuthError(Exception):
    """Raised by `Authenticator.check`: 401 (missing/wrong key) or 403 (not an admin)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Authenticator:
    """Checks `Authorization: Bearer KEY` against the configured keys."""

    def __init__(self, keys: list[str], admin_keys: list[str], open_access: bool) -> None:
        self._keys = [k.encode("utf-8") for k in keys]
        self._admin_keys = [k.encode("utf-8") for k in admin_keys]
        self.open_access = open_access

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> Authenticator:
        """Read the key sources and apply the secure default (raises AuthConfigError)."""
        keys = read_keys(cfg.api_keys_env, cfg.api_keys_file)
        admin_keys = read_keys(cfg.admin_api_keys_env, cfg.admin_api_keys_file)
        open_access = not keys and not admin_keys  # admin keys alone still close the API to others
        if open_access and not is_loopback(cfg.host) and not cfg.allow_unauthenticated:
            raise AuthConfigError(
                f"no API keys are configured (${cfg.api_keys_env} is empty"
                + (f", {cfg.api_keys_file} has none" if cfg.api_keys_file else "")
                + f") and the server would listen on {cfg.host}, which is not a loopback address; set keys, "
                "bind 127.0.0.1, or pass --allow-unauthenticated (allow_unauthenticated: true) "
                "to run open on purpose"
            )
        return cls(keys, admin_keys, open_access)

    @property
    def num_keys(self) -> int:
        return len(self._keys) + len(self._admin_keys)

    def describe(self, host: str) -> str:
        """A start-up line saying how the API is protected (never the keys themselves)."""
        if self.open_access:
            where = "loopback only" if is_loopback(host) else "ALL interfaces (allow_unauthenticated)"
            return (
                f"WARNING: no API keys configured: the API is open without authentication on {host} ({where})"
            )
        return f"API key authentication on: {len(self._keys)} key(s), {len(self._admin_keys)} admin key(s)"

    def check(self, authorization: str | None, *, admin: bool = False) -> Principal:
        if self.open_access:
            return Principal("anonymous", admin=True)
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'")
        candidate = token.encode("utf-8")
        is_admin = _matches(candidate, self._admin_keys)
        if admin:
            if is_admin:
                return Principal(fingerprint(token), admin=True)
            if _matches(candidate, self._keys):
                raise AuthError(403, "this endpoint needs an admin API key")
            raise AuthError(401, "invalid API key")
        if is_admin or _matches(candidate, self._keys):
            return Principal(fingerprint(token), admin=is_admin)
        raise AuthError(401, "invalid API key")


def _matches(candidate: bytes, keys: list[bytes]) -> bool:
    found = False
    for key in keys:  # compare with every key (no early exit): timing says nothing about which one
        found |= hmac.compare_digest(candidate, key)
    return found


class RateLimiter:
    """A token bucket per key: `per_minute` requests per minute, bursts up to the same number."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0  # tokens per second
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill time)
        self._lock = threading.Lock()

    def acquire(self, key_id: str) -> float:
        """0 if the request may go ahead, else the seconds to wait before retrying."""
        if self.per_minute <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return max(math.ceil((1.0 - tokens) / self.rate), 1)
