"""The gate: absolute bounds, regression against a baseline in the right direction, checked up front."""

from __future__ import annotations

import pytest

from lmforge.components.evaluate.gate import GateConfig, Rule, apply_gate, load_gate
from lmforge.errors import ConfigError

TASKS = {"heldout": {"bits_per_byte": 1.20, "perplexity": 9.0}, "qa": {"rougeL": 0.30}}
KEYS = {"heldout": ("perplexity", "bits_per_byte", "tokens", "bytes", "items"), "qa": ("rougeL", "items")}


def test_absolute_bounds_pass_and_fail():
    gate = GateConfig([Rule("heldout.bits_per_byte", max=1.5), Rule("qa.rougeL", min=0.2)])
    assert apply_gate(gate, TASKS, None) == {
        "passed": True,
        "reasons": [],
        "rules": [
            {"rule": "heldout.bits_per_byte (max 1.5)", "value": 1.2, "passed": True},
            {"rule": "qa.rougeL (min 0.2)", "value": 0.3, "passed": True},
        ],
    }
    failed = apply_gate(GateConfig([Rule("qa.rougeL", min=0.5)]), TASKS, None)
    assert not failed["passed"] and failed["reasons"] == ["qa.rougeL = 0.3 is below the minimum 0.5"]
    assert not apply_gate(GateConfig([Rule("qa.rougeL", min=0.2)]), {"qa": {"rougeL": float("nan")}}, None)[
        "passed"
    ]


def test_max_regression_knows_which_direction_is_worse():
    gate = GateConfig(
        [Rule("heldout.bits_per_byte", max_regression=0.01), Rule("qa.rougeL", max_regression=0.1)]
    )
    # bits per byte 1.20 vs 1.19: 0.84% worse (allowed); rougeL 0.30 vs 0.32: 6.25% worse (allowed)
    base = {"heldout": {"bits_per_byte": 1.19}, "qa": {"rougeL": 0.32}}
    assert apply_gate(gate, TASKS, base)["passed"]
    # bits per byte 1.20 vs 1.10: 9% worse -> fails; rougeL higher than the baseline is never a regression
    base = {"heldout": {"bits_per_byte": 1.10}, "qa": {"rougeL": 0.10}}
    result = apply_gate(gate, TASKS, base)
    assert not result["passed"] and len(result["reasons"]) == 1
    assert result["reasons"][0].startswith(
        "heldout.bits_per_byte = 1.2 is 9.09% worse than the baseline's 1.1"
    )
    # an improvement in bits per byte is fine however large
    assert apply_gate(gate, TASKS, {"heldout": {"bits_per_byte": 2.0}, "qa": {"rougeL": 0.3}})["passed"]


@pytest.mark.parametrize(
    ("rules", "baseline", "expected"),
    [
        ("- {metric: nope.acc, min: 0.5}", False, "names no task of the suite"),
        ("- {metric: qa.acc, min: 0.5}", False, "task 'qa' reports rougeL, items, not 'acc'"),
        ("- {metric: qa.rougeL, max_regression: 0.01}", False, "needs --baseline"),
        ("- {metric: heldout.tokens, max_regression: 0.01}", True, "no better direction"),
        ("- {metric: qa.rougeL}", False, "give min, max or max_regression"),
        ("- {metric: rougeL, min: 1}", False, "TASK.METRIC"),
    ],
)
def test_bad_gates_are_refused_before_evaluation(tmp_path, rules, baseline, expected):
    (tmp_path / "g.yaml").write_text(f"rules:\n  {rules}\n")
    with pytest.raises(ConfigError, match=None) as err:
        load_gate(str(tmp_path / "g.yaml"), KEYS, has_baseline=baseline)
    assert expected in str(err.value)
