#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the project and everything its tests,
# benchmarks and examples need (numba, torch CPU, transformers, gguf, matplotlib, pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[model,bench,test]"
