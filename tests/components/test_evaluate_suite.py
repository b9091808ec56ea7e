"""Suite files: validated with every item before any model loads; errors name the task and the item."""

from __future__ import annotations

import pytest
from _evaluate_data import write_jsonl, write_suite

from lmforge.components.evaluate.suite import load_suite, render_prompt
from lmforge.errors import USER_ERRORS


def test_demo_like_suite_loads_with_relative_paths_and_limit(tmp_path):
    suite = load_suite(write_suite(tmp_path), limit=2)
    assert [t.name for t in suite.tasks] == ["heldout", "qa", "pick"]
    assert [len(t.items) for t in suite.tasks] == [2, 2, 2]
    qa = suite.task("qa")
    assert qa.config.stop == ["\n"] and qa.config.max_new_tokens == 6
    assert render_prompt(qa.config.prompt, qa.items[0]).startswith("Q: The quick")
    assert suite.tasks[0].origins[0].endswith("heldout.jsonl:1")


def test_data_may_be_a_curated_split_folder(tmp_path):
    (tmp_path / "validation").mkdir()
    write_jsonl(tmp_path / "validation" / "part-00000.jsonl", [{"text": "a"}, {"text": "b"}])
    write_jsonl(tmp_path / "validation" / "part-00001.jsonl", [{"text": "c"}])
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: h, type: perplexity, data: validation}\n")
    assert [i["text"] for i in load_suite(tmp_path / "s.yaml").tasks[0].items] == ["a", "b", "c"]


def test_overrides_set_suite_fields(tmp_path):
    suite = load_suite(write_suite(tmp_path), overrides=["window=16", "stride=8"])
    assert (suite.config.window, suite.config.stride) == (16, 8)


@pytest.mark.parametrize(
    ("task_yaml", "rows", "expected"),
    [
        ("{name: x, type: classify, data: d.jsonl}", [{"text": "a"}], "task 'x': unknown type 'classify'"),
        (
            "{name: x, type: generate, data: d.jsonl, prompt: '{q}', target: a, metrics: [blue]}",
            [{"q": "1", "a": "2"}],
            "task 'x': unknown metric(s) ['blue']",
        ),
        ("{name: x, type: perplexity, data: d.jsonl}", [], "task 'x': data"),
        (
            "{name: x, type: perplexity, data: d.jsonl}",
            [{"text": "a"}, {"body": "b"}],
            "d.jsonl:2 has no field 'text'",
        ),
        (
            "{name: x, type: generate, data: d.jsonl, prompt: '{q} {ctx}', target: a}",
            [{"q": "1", "a": "2"}],
            "d.jsonl:1 has no field 'ctx' (used by the prompt)",
        ),
        (
            "{name: x, type: choice, data: d.jsonl, prompt: '{q}', choices: c, answer: y}",
            [{"q": "1", "c": ["a", "b"], "y": 2}],
            "field 'y' must be an index into 'c'",
        ),
        ("{name: x, type: perplexity, data: missing.jsonl}", None, "task 'x': data"),
        ("{name: x, type: perplexity, data: d.jsonl, bogus: 1}", [{"text": "a"}], "bogus: unknown field"),
    ],
)
def test_bad_suites_fail_naming_the_task_and_item(tmp_path, task_yaml, rows, expected):
    if rows is not None:
        write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "s.yaml").write_text(f"tasks:\n  - {task_yaml}\n")
    with pytest.raises(USER_ERRORS) as err:
        load_suite(tmp_path / "s.yaml")
    assert expected in str(err.value)
