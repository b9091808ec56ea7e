#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's Python (3.12, x86-64, no network) lacks for
# benchmarks/gpu_session.sh: pydantic and its compiled core (used by the pretraining config).
# torch, safetensors, numpy, pyyaml and tqdm are already installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY=${VENV_PY:-.venv/bin/python}
version() { "$VENV_PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
mkdir -p .whl
for pkg in pydantic pydantic-core annotated-types typing-inspection; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg==$(version "$pkg")"
done
ls -1 .whl
