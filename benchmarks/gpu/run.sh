#!/usr/bin/env bash
# One command on a CUDA machine: make the packages importable, then check and time IceCache's GPU path.
#   bash benchmarks/gpu/run.sh [--tests] [gpu_path.py arguments]   (results: benchmarks/results/gpu/ or --out DIR)
# --tests first runs the kernel and offload unit tests on the GPU (tests/test_kernels.py, tests/test_offload.py,
# tests/test_prefill_staging.py: the host-resident pool's reads and writes of registered host memory;
# tests/test_rerank.py: re-ranked tokens written into a plan on the device without a sync).
# Wheels (and the trimmed flashinfer tarball, see benchmarks/gpu/README.md) found in .whl/ are installed into
# /tmp/site first, for machines that cannot reach a package index.
set -euo pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*" >/dev/null; then
  mkdir -p /tmp/site
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  for t in .whl/*.tar.xz; do [ -e "$t" ] && tar -xJf "$t" -C /tmp/site; done
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# icecache_sglang as installed (kernels/ and patches/ become its subpackages), without a build step
if ! python3 -c "import icecache_sglang.kernels" 2>/dev/null; then
  rm -rf /tmp/icecache_pkg && mkdir -p /tmp/icecache_pkg
  cp -r icecache_sglang /tmp/icecache_pkg/
  cp -r kernels /tmp/icecache_pkg/icecache_sglang/kernels
  cp -r patches /tmp/icecache_pkg/icecache_sglang/patches
  export PYTHONPATH=/tmp/icecache_pkg${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/flashinfer-ws}
if [ "${1:-}" = "--tests" ]; then
  shift
  PYTHONSAFEPATH=1 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_offload.py \
    tests/test_prefill_staging.py tests/test_rerank.py
fi
exec python3 benchmarks/gpu/gpu_path.py "$@"
