"""model/ (installed as `lmforge.model`) is pure PyTorch: it may import torch, safetensors, the standard
library and itself only, never the rest of lmforge."""

import ast
import sys
from pathlib import Path

ALLOWED_THIRD_PARTY = {"torch", "safetensors"}
MODEL_DIR = Path(__file__).resolve().parents[2] / "model"


def _root(module: str) -> str:
    """`lmforge.model.x` -> `lmforge.model` (the package itself); anything else -> its top-level name."""
    return (
        "lmforge.model"
        if module == "lmforge.model" or module.startswith("lmforge.model.")
        else module.split(".")[0]
    )


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {_root(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(_root(node.module))
    return roots


def test_model_package_imports_only_torch_and_stdlib():
    offenders = {}
    for path in sorted(MODEL_DIR.rglob("*.py")):
        bad = {
            root
            for root in _imported_roots(path)
            if root not in ALLOWED_THIRD_PARTY
            and root != "lmforge.model"
            and root not in sys.stdlib_module_names
        }
        if bad:
            offenders[str(path.relative_to(MODEL_DIR.parent))] = sorted(bad)
    assert not offenders, f"model/ must not import infrastructure: {offenders}"
