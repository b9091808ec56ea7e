"""Imports point inward: cli -> pipelines -> components / serving -> core -> model.

Read from the source with `ast`, so a forbidden import fails here even when no test exercises it.
The model package has its own, stricter test (tests/model/test_imports.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = [
    "errors",
    "config",
    "tracking",
    "registry",
    "tokenizer_files",
    "devices",
    "ray_logs",
    "storage",
    "memory",
]

# folder -> lmforge subpackages its modules must never import
FORBIDDEN = {
    "lmforge": ["lmforge.cli", "lmforge.pipelines", "lmforge.components", "lmforge.serving"],
    "components": ["lmforge.cli", "lmforge.pipelines", "lmforge.serving"],
    "serving": ["lmforge.cli", "lmforge.pipelines", "lmforge.components"],
    "pipelines": ["lmforge.cli"],
}

# narrow exceptions: module -> why it may be imported across the rule above
ALLOWED = {
    # the text edge of model/ generation (encode, detokenize, stop strings): torch + tokenizers only, no
    # Ray or HTTP; the evaluate stage generates text with it, exactly as `lmforge generate` and serving do
    "lmforge.serving.textgen": ["components"],
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _sources(folder: str) -> list[Path]:
    if folder == "lmforge":  # the core: lmforge/*.py, not the CLI package below it
        return [REPO / "lmforge" / f"{name}.py" for name in [*CORE, "__init__"]]
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_inward(folder):
    offenders = {}
    for path in _sources(folder):
        bad = sorted(
            m
            for m in _imports(path)
            for f in FORBIDDEN[folder]
            if (m == f or m.startswith(f + ".")) and folder not in ALLOWED.get(m, [])
        )
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, f"{folder}/ imports a layer above it: {offenders}"


def test_core_lists_every_module_of_the_core():
    on_disk = {p.stem for p in (REPO / "lmforge").glob("*.py")} - {"__init__"}
    assert on_disk == set(CORE)
