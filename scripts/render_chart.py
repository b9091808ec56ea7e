"""Render the Helm chart `charts/lmforge` offline, exactly as `helm install` would, with Helm's own library.

One helper for everything that needs the chart's manifests: the chart tests (tests/deploy/test_chart.py)
validate what it renders, and the kind end-to-end script (scripts/kind_e2e.sh) applies what it renders,
so the cluster receives exactly the objects the tests checked. No helm binary is needed: PyPI's
`helm-python-sdk` embeds Helm's library (values are checked against values.schema.json on render).

    python scripts/render_chart.py -f charts/lmforge/ci/kind-values.yaml --namespace lmforge -o manifests.yaml
    python scripts/render_chart.py -f ... --skip-kind RayService -o platform.yaml   # apply in two steps
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = REPO_ROOT / "charts" / "lmforge"


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_values(values_files: list[str | Path] = (), values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Values files in order (later wins), then `values` on top (like helm's -f ... then --set)."""
    merged: dict[str, Any] = {}
    for path in values_files:
        merged = merge_values(merged, yaml.safe_load(Path(path).read_text()) or {})
    return merge_values(merged, values or {})


def render_templates(
    values: dict[str, Any] | None = None,
    *,
    values_files: list[str | Path] = (),
    name: str = "lmforge",
    namespace: str = "lmforge",
    chart_dir: str | Path = CHART_DIR,
) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included). Raises helm_python's HelmValuesError for
    values the schema rejects and HelmRenderError for a failed template (the chart's own checks)."""
    import helm_python

    chart = helm_python.Chart.load(str(chart_dir))
    try:
        return chart.render(
            load_values(values_files, values), name=name, namespace=namespace, is_install=True
        )
    finally:
        chart.close()


def render(
    values: dict[str, Any] | None = None,
    *,
    values_files: list[str | Path] = (),
    name: str = "lmforge",
    namespace: str = "lmforge",
) -> list[dict[str, Any]]:
    """The chart's Kubernetes objects, in a stable order (by template path, then document order)."""
    templates = render_templates(values, values_files=values_files, name=name, namespace=namespace)
    docs: list[dict[str, Any]] = []
    for path in sorted(templates):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(templates[path]):
            if doc:
                if "metadata" in doc and "namespace" not in doc["metadata"]:
                    doc["metadata"]["namespace"] = namespace
                docs.append(doc)
    return docs


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the Serve config, scripts, the dashboard) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_yaml(docs: list[dict[str, Any]]) -> str:
    """One multi-document YAML stream for `kubectl apply -f`."""
    return "".join("---\n" + yaml.dump(doc, Dumper=_Dumper, sort_keys=False) for doc in docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
    parser.add_argument("--name", default="lmforge", help="release name (default: lmforge)")
    parser.add_argument("--namespace", default="lmforge", help="namespace (default: lmforge)")
    parser.add_argument("-o", "--output", help="write the manifests here (default: stdout)")
    kinds = parser.add_mutually_exclusive_group()
    kinds.add_argument(
        "--only-kind", action="append", default=[], metavar="KIND", help="keep only these kinds"
    )
    kinds.add_argument(
        "--skip-kind", action="append", default=[], metavar="KIND", help="leave these kinds out"
    )
    args = parser.parse_args(argv)
    try:
        docs = render(values_files=args.values, name=args.name, namespace=args.namespace)
    except Exception as err:  # helm_python's errors carry the schema/template message
        print(f"render_chart: {err}", file=sys.stderr)
        return 2
    if args.only_kind:
        docs = [d for d in docs if d["kind"] in args.only_kind]
    docs = [d for d in docs if d["kind"] not in args.skip_kind]
    text = render_yaml(docs)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
