"""YAML + --set overrides validated into dataclasses; errors name the field path."""

from dataclasses import dataclass, field

import pytest

from lmforge.config import apply_overrides, build, load
from lmforge.model.config import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError("train.steps must be positive")


@dataclass
class Outer:
    name: str = "x"
    train: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\ntrain:\n  lr: 0.01\n")
    cfg = load(Outer, path, ["train.steps=5", "tags=[a, b]"])
    assert cfg == Outer(name="demo", train=Inner(lr=0.01, steps=5), tags=["a", "b"])


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr: Input should be a valid number"):
        build(Outer, {"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"train\.epochs: unknown field"):
        build(Outer, {"train": {"epochs": 3}})
    with pytest.raises(ConfigError, match="train.steps must be positive"):
        build(Outer, {"train": {"steps": 0}})
    with pytest.raises(ConfigError, match="does not exist"):
        load(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.subkey=value"):
        apply_overrides({}, ["novalue"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load(Outer, bad)
