"""The distribution installs one import namespace, `lmforge`, over the repository's top-level folders."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "lmforge": "lmforge",
    "lmforge.model": "model",
    "lmforge.components": "components",
    "lmforge.pipelines": "pipelines",
    "lmforge.serving": "serving",
}


def _setuptools_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_installed_distribution_provides_only_the_lmforge_top_level_package():
    top_level = importlib.metadata.distribution("lmforge").read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["lmforge"]


def test_every_python_package_folder_is_listed_under_its_lmforge_name():
    table = _setuptools_table()
    assert table["package-dir"] == FOLDERS
    expected = set()
    for name, folder in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            expected.add(".".join([name, *rel.parts]))
    assert set(table["packages"]) == expected


def test_bare_folder_names_are_not_importable_outside_the_repository(tmp_path):
    code = (
        "import importlib.util as u; "
        "print([m for m in ('model', 'components', 'serving', 'pipelines') if u.find_spec(m)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
    subprocess.run(
        [sys.executable, "-c", "import lmforge.model, lmforge.serving.app, lmforge.cli"],
        cwd=tmp_path,
        check=True,
    )


@pytest.mark.slow
def test_built_wheel_holds_only_lmforge(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lmforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"lmforge", next(t for t in tops if t.endswith(".dist-info"))}
    assert "lmforge/model/transformer.py" in names and "lmforge/serving/serve_config.yaml" in names
    assert "lmforge/cli/__main__.py" in names
