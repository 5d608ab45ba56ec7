#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the project and everything its tests,
# benchmarks, examples and the SGLang server need (numba, torch CPU, transformers, gguf, matplotlib, pytest,
# SGLang 0.5.23 and its serving requirements).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" -e ".[model,bench,test,server]"
# SGLang pins a CUDA build of torch and GPU-only packages; the server extra above holds what it imports on
# the CPU path (shared/design/sglang-integration.md section 6), so SGLang itself goes in without its pins.
if ! .venv/bin/python -c "import importlib.metadata as m; assert m.version('sglang') == '0.5.23'" 2>/dev/null; then
    "${PIP[@]}" --no-deps "sglang==0.5.23"
fi
# CPU stand-ins for sgl_kernel / torchvision, at the END of sys.path: a real install always wins.
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/cpu_stubs" > "$SITE/zz_icecache_cpu_stubs.pth"
