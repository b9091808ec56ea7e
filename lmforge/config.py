"""YAML configs validated into typed dataclasses, with `--set a.b=value` overrides.

Every stage config is a plain dataclass (validated in its own `__post_init__`); pydantic does the
type checking and coercion of the raw YAML so that an error names the field path and the reason,
e.g. `train.lr: Input should be a valid number`. Unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from lmforge.model.config import ConfigError

T = TypeVar("T")
_STRICT = ConfigDict(extra="forbid")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `key.sub=value` strings; values are parsed as YAML scalars (`3`, `1e-4`, `true`, `[1,2]`)."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return data


def build(cls: type[T], data: dict[str, Any]) -> T:
    """Validate a raw mapping into `cls`; errors name the dotted field path."""
    for sub in _dataclass_tree(cls):
        if not hasattr(sub, "__pydantic_config__"):
            # unknown keys are errors (pydantic reads this attribute from plain dataclasses)
            sub.__pydantic_config__ = _STRICT  # type: ignore[attr-defined]
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(
                f"{where}: {msg}"
                if e["type"] not in ("extra_forbidden", "unexpected_keyword_argument")
                else f"{where}: unknown field"
            )
        raise ConfigError("invalid config: " + "; ".join(problems)) from None


def load(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> T:
    data = dict(base or {})
    if path is not None:
        data.update(read_yaml(path))
    return build(cls, apply_overrides(data, overrides))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _dataclass_tree(cls: type) -> list[type]:
    seen, stack = [], [cls]
    while stack:
        c = stack.pop()
        if dataclasses.is_dataclass(c) and c not in seen:
            seen.append(c)
            hints = typing.get_type_hints(c)
            for f in dataclasses.fields(c):
                hint = hints.get(f.name)
                for t in (hint, *typing.get_args(hint)):
                    if isinstance(t, type) and dataclasses.is_dataclass(t):
                        stack.append(t)
    return seen
