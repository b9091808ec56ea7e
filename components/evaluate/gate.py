"""The promotion gate: rules over `TASK.METRIC` that a model must meet, absolute or against a baseline.

    rules:
      - {metric: heldout.bits_per_byte, max: 1.5}              # absolute bounds: min / max
      - {metric: summarize.rougeL, min: 0.2}
      - {metric: heldout.bits_per_byte, max_regression: 0.01}  # vs --baseline: at most 1% worse

`max_regression` is relative to the baseline's value and knows which way is worse: up for perplexity
and bits per byte, down for every score. The gate file is checked against the suite before any model
loads (a rule naming an unknown task or metric, or a regression rule without a baseline, is an error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lmforge.config import load
from lmforge.errors import ConfigError

LOWER_IS_BETTER = frozenset({"perplexity", "bits_per_byte"})
HIGHER_IS_BETTER = frozenset(
    {"rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "token_f1", "acc", "acc_norm"}
)


@dataclass
class Rule:
    metric: str  # TASK.METRIC
    min: float | None = None
    max: float | None = None
    max_regression: float | None = None  # relative: 0.01 = at most 1% worse than the baseline

    def __post_init__(self) -> None:
        task, dot, name = self.metric.partition(".")
        if not dot or not task or not name:
            raise ValueError(f"rule {self.metric!r}: metric must look like TASK.METRIC")
        if self.min is None and self.max is None and self.max_regression is None:
            raise ValueError(f"rule {self.metric!r}: give min, max or max_regression")
        if self.max_regression is not None:
            if self.max_regression < 0:
                raise ValueError(f"rule {self.metric!r}: max_regression must be >= 0")
            if name not in LOWER_IS_BETTER | HIGHER_IS_BETTER:
                raise ValueError(f"rule {self.metric!r}: {name} has no better direction for max_regression")

    @property
    def task(self) -> str:
        return self.metric.partition(".")[0]

    @property
    def name(self) -> str:
        return self.metric.partition(".")[2]

    def describe(self) -> str:
        parts = [f"{k} {v:g}" for k, v in (("min", self.min), ("max", self.max)) if v is not None]
        if self.max_regression is not None:
            parts.append(f"max_regression {self.max_regression:.2%}")
        return f"{self.metric} ({', '.join(parts)})"


@dataclass
class GateConfig:
    rules: list[Rule] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("rules: the gate lists no rule")


def load_gate(path: str, metric_keys: dict[str, tuple[str, ...]], has_baseline: bool) -> GateConfig:
    """Read and check a gate file against the suite's tasks (task -> the metric keys it reports)."""
    gate = load(GateConfig, path)
    for rule in gate.rules:
        if rule.task not in metric_keys:
            raise ConfigError(
                f"gate {path}: rule {rule.metric!r} names no task of the suite ({', '.join(metric_keys)})"
            )
        if rule.name not in metric_keys[rule.task]:
            raise ConfigError(
                f"gate {path}: rule {rule.metric!r}: task {rule.task!r} reports "
                f"{', '.join(metric_keys[rule.task])}, not {rule.name!r}"
            )
        if rule.max_regression is not None and not has_baseline:
            raise ConfigError(
                f"gate {path}: rule {rule.metric!r} uses max_regression, which needs --baseline"
            )
    return gate


def regression(name: str, value: float, base: float) -> float:
    """How much worse `value` is than `base`, relative to |base| (<= 0: not worse)."""
    worse_by = value - base if name in LOWER_IS_BETTER else base - value
    if base == 0:
        return 0.0 if worse_by <= 0 else math.inf
    return worse_by / abs(base)


def apply_gate(
    gate: GateConfig, tasks: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]] | None
) -> dict[str, Any]:
    """{"passed": bool, "reasons": [one line per failed check], "rules": [every check with its value]}."""
    reasons, checks = [], []
    for rule in gate.rules:
        value = tasks[rule.task][rule.name]
        failed = []
        if rule.min is not None and not value >= rule.min:
            failed.append(f"{rule.metric} = {value:.4g} is below the minimum {rule.min:g}")
        if rule.max is not None and not value <= rule.max:
            failed.append(f"{rule.metric} = {value:.4g} is above the maximum {rule.max:g}")
        check: dict[str, Any] = {"rule": rule.describe(), "value": value}
        if rule.max_regression is not None:
            assert baseline is not None  # load_gate refuses regression rules without a baseline
            base = baseline[rule.task][rule.name]
            worse = regression(rule.name, value, base)
            check.update(baseline=base, regression=worse)
            if worse > rule.max_regression:
                failed.append(
                    f"{rule.metric} = {value:.4g} is {worse:.2%} worse than the baseline's {base:.4g} "
                    f"(allowed {rule.max_regression:.2%})"
                )
        check["passed"] = not failed
        checks.append(check)
        reasons.extend(failed)
    return {"passed": not reasons, "reasons": reasons, "rules": checks}
