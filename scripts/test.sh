#!/usr/bin/env bash
# The test suite: set-up, then pytest over tests/. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Keep the repository root off sys.path: its kernels/ folder would shadow the PyPI package SGLang imports.
export PYTHONSAFEPATH=1
exec .venv/bin/python -m pytest "$@"
