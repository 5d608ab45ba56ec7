#!/usr/bin/env bash
# A sparse anchor layer's host path on the GPU machine (layer_overhead.py), after installing the carry.
#   bash benchmarks/gpu/layer_overhead.sh [layer_overhead.py flags]   (records: $OUT, else benchmarks/results/gpu)
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p /tmp/site
T0=$(date +%s)
{
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  for t in .whl/*.tar.xz; do tar -xJf "$t" -C /tmp/site || exit 1; done
} > /tmp/install.log 2>&1 || { echo "INSTALL FAILED"; tail -40 /tmp/install.log; exit 1; }
source benchmarks/gpu/sglang_env.sh
echo "installed in $(( $(date +%s) - T0 )) s; $(nvidia-smi --query-gpu=name --format=csv,noheader)"
timeout "${LAYER_OVERHEAD_SECONDS:-200}" python3 benchmarks/gpu/layer_overhead.py "$@"
echo "exit $? total $(( $(date +%s) - T0 )) s"
