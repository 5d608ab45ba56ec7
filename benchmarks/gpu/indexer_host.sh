#!/usr/bin/env bash
# The indexer alone on the GPU machine's CPUs (no SGLang, no GPU): benchmarks/build_workers.py there.
#   bash benchmarks/gpu/indexer_host.sh [build_workers.py flags]   (records: $OUT, else benchmarks/results/gpu/indexer_host)
# Needs msgspec and pyzmq wheels in .whl/ (benchmarks/gpu/build_carry.sh); numpy and numba come with the machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/msgspec-*.whl .whl/pyzmq-*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export ICECACHE_BENCH_RESULTS=${OUT:-benchmarks/results/gpu/indexer_host}
echo "cores $(nproc); $(python3 -c 'import numba, numpy; print("numba", numba.__version__, "numpy", numpy.__version__)')"
t0=$(date +%s)
timeout "${INDEXER_HOST_SECONDS:-270}" python3 benchmarks/build_workers.py "$@" || echo "build_workers exit $?"
echo "total $(( $(date +%s) - t0 )) s"
