"""Task suites: a YAML file listing tasks, validated and loaded with their items BEFORE any model loads.

    tasks:
      - {name: heldout, type: perplexity, data: data/eval/heldout.jsonl, text: text}
      - {name: summarize, type: generate, data: summaries.jsonl, prompt: "{document}\\n\\nSummary:",
         target: summary, metrics: [rougeL, bleu], max_new_tokens: 48, stop: ["\\n"]}
      - {name: pick, type: choice, data: choice.jsonl, prompt: "{question}\\nAnswer:",
         choices: choices, answer: answer}

`data` is a JSONL file or a folder of `*.jsonl` files (a curated split such as `out/data/validation`),
relative to the suite file. Every problem a user can make (unknown type or metric, a placeholder or
field an item lacks, an empty file) is a `ConfigError`/`UserError` naming the task and the item, so
a bad suite costs no model load. Suite-level `window`/`stride` set the perplexity sliding window.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import load
from lmforge.errors import ConfigError, InputNotFoundError, UserError

TASK_TYPES = ("perplexity", "generate", "choice")
GENERATE_METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "token_f1")
# the keys each task type writes into metrics.json (the gate checks rules against these)
METRIC_KEYS = {
    "perplexity": ("perplexity", "bits_per_byte", "tokens", "bytes", "items"),
    "generate": (*GENERATE_METRICS, "items"),
    "choice": ("acc", "acc_norm", "items"),
}
DECONTAMINATE_MODES = ("report", "filter")


@dataclass
class TaskConfig:
    """One task; which fields matter depends on `type` (the others must stay unset)."""

    name: str
    type: str
    data: str
    text: str = "text"  # perplexity: the field holding the document
    prompt: str | None = None  # generate / choice: template with {field} placeholders from the item
    target: str | None = None  # generate: the field holding the reference
    metrics: list[str] | None = None  # generate: default all of GENERATE_METRICS
    max_new_tokens: int = 64
    temperature: float = 0.0
    stop: list[str] = field(default_factory=list)
    choices: str | None = None  # choice: the field holding the list of continuations
    answer: str | None = None  # choice: the field holding the index of the right one
    target_delimiter: str = " "  # choice: between prompt and continuation (lm-evaluation-harness default)

    def __post_init__(self) -> None:
        def fail(why: str) -> None:
            raise ValueError(f"task {self.name!r}: {why}")

        if not self.name or "." in self.name:
            fail("name must be non-empty and hold no '.' (gate rules address TASK.METRIC)")
        if self.type not in TASK_TYPES:
            fail(f"unknown type {self.type!r}; use one of {', '.join(TASK_TYPES)}")
        if self.type == "perplexity":
            if self.prompt or self.target or self.metrics or self.choices or self.answer:
                fail("a perplexity task takes `text` only (no prompt/target/metrics/choices/answer)")
            return
        if not self.prompt:
            fail(f"a {self.type} task needs `prompt` (a template with {{field}} placeholders)")
        prompt_fields(self.prompt, self.name)
        if self.type == "generate":
            if not self.target:
                fail("a generate task needs `target` (the field holding the reference)")
            self.metrics = list(self.metrics) if self.metrics is not None else list(GENERATE_METRICS)
            unknown = [m for m in self.metrics if m not in GENERATE_METRICS]
            if unknown or not self.metrics:
                fail(f"unknown metric(s) {unknown}; choose from {', '.join(GENERATE_METRICS)}")
            if self.max_new_tokens < 1 or self.temperature < 0:
                fail("max_new_tokens must be >= 1 and temperature >= 0")
        else:
            if not self.choices or not self.answer:
                fail("a choice task needs `choices` (list field) and `answer` (index field)")
            if self.metrics:
                fail("a choice task always reports acc and acc_norm; remove `metrics`")

    @property
    def metric_keys(self) -> tuple[str, ...]:
        if self.type == "generate":
            return (*(self.metrics or ()), "items")
        return METRIC_KEYS[self.type]


@dataclass
class SuiteConfig:
    tasks: list[TaskConfig]
    window: int | None = None  # perplexity: tokens per forward (default: the model's context)
    stride: int | None = None  # perplexity: new tokens scored per window (default: window, no overlap)
    decontaminate: str = "report"  # with --train-data: report overlap, or also filter contaminated items
    ngram: int = 13  # decontamination n-gram length
    # an item is contaminated when this share of its n-grams is in the training split; None: any
    # shared n-gram (GPT-3's and lm-evaluation-harness's rule)
    contamination_threshold: float | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: the suite lists no task")
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tasks: task names must be unique, repeated: {dupes}")
        if self.window is not None and self.window < 2:
            raise ValueError("window must be >= 2 tokens")
        if self.stride is not None and (self.stride < 1 or (self.window and self.stride > self.window)):
            raise ValueError("stride must be >= 1 and at most window")
        if self.decontaminate not in DECONTAMINATE_MODES:
            raise ValueError(
                f"decontaminate must be one of {DECONTAMINATE_MODES}, got {self.decontaminate!r}"
            )
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {self.ngram}")
        if self.contamination_threshold is not None and not 0 < self.contamination_threshold <= 1:
            raise ValueError(f"contamination_threshold must be in (0, 1], got {self.contamination_threshold}")


@dataclass
class Task:
    """A validated task with its items (dicts from the JSONL) and where each came from."""

    config: TaskConfig
    items: list[dict[str, Any]]
    origins: list[str]  # "file:line" of each item, for error messages

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class Suite:
    config: SuiteConfig
    tasks: list[Task]
    path: Path

    def task(self, name: str) -> Task | None:
        return next((t for t in self.tasks if t.name == name), None)


def prompt_fields(template: str, task: str) -> list[str]:
    """The {field} names a prompt template uses (format-spec syntax; `{{` is a literal brace)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"task {task!r}: prompt {template!r} is not a valid template: {err}") from None
    if any(not n or not n.isidentifier() for n in names):
        raise ValueError(f"task {task!r}: prompt placeholders must be {{field}} names, got {names}")
    return names


def render_prompt(template: str, item: dict[str, Any]) -> str:
    return template.format_map({k: v if isinstance(v, str) else json.dumps(v) for k, v in item.items()})


def load_suite(path: str | Path, overrides: list[str] | None = None, limit: int | None = None) -> Suite:
    """Validate the suite file and load every task's items (the first `limit` of each, if given)."""
    path = Path(path)
    config = load(SuiteConfig, path, overrides)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    tasks = []
    for cfg in config.tasks:
        items, origins = _read_items(cfg, _resolve(path, cfg.data))
        if limit is not None:
            items, origins = items[:limit], origins[:limit]
        for item, origin in zip(items, origins, strict=True):
            _check_item(cfg, item, origin)
        tasks.append(Task(cfg, items, origins))
    return Suite(config, tasks, path)


def _resolve(suite_path: Path, data: str) -> Path:
    p = Path(data).expanduser()
    return p if p.is_absolute() else suite_path.resolve().parent / p


def _read_items(cfg: TaskConfig, data: Path) -> tuple[list[dict[str, Any]], list[str]]:
    if data.is_dir():
        files = sorted(data.glob("*.jsonl"))
        if not files:
            raise UserError(f"task {cfg.name!r}: data folder {data} holds no *.jsonl file")
    elif data.is_file():
        files = [data]
    else:
        raise InputNotFoundError(f"task {cfg.name!r}: data {data} does not exist")
    items, origins = [], []
    for file in files:
        with file.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"task {cfg.name!r}: {file}:{n} is not valid JSON: {err}") from None
                if not isinstance(item, dict):
                    raise UserError(f"task {cfg.name!r}: {file}:{n} must be a JSON object")
                items.append(item)
                origins.append(f"{file}:{n}")
    if not items:
        raise UserError(f"task {cfg.name!r}: data {data} holds no items")
    return items, origins


def _check_item(cfg: TaskConfig, item: dict[str, Any], origin: str) -> None:
    def fail(why: str) -> None:
        raise UserError(f"task {cfg.name!r}: item {origin} {why}")

    def need_str(name: str, allow_empty: bool = False) -> None:
        if name not in item:
            fail(f"has no field {name!r}")
        if not isinstance(item[name], str) or (not allow_empty and not item[name]):
            fail(f"field {name!r} must be a non-empty string")

    if cfg.type == "perplexity":
        need_str(cfg.text)
        return
    assert cfg.prompt is not None
    for name in prompt_fields(cfg.prompt, cfg.name):
        if name not in item:
            fail(f"has no field {name!r} (used by the prompt)")
    if cfg.type == "generate":
        assert cfg.target is not None
        need_str(cfg.target, allow_empty=True)
        return
    assert cfg.choices is not None and cfg.answer is not None
    choices = item.get(cfg.choices)
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        fail(f"field {cfg.choices!r} must be a list of at least two non-empty strings")
    answer = item.get(cfg.answer)
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        fail(f"field {cfg.answer!r} must be an index into {cfg.choices!r} (0..{len(choices) - 1})")


__all__ = ["ConfigError", "Suite", "SuiteConfig", "Task", "TaskConfig", "load_suite", "render_prompt"]
