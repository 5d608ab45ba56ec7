#!/usr/bin/env bash
# One command on the GPU machine: install the carried SGLang 0.5.23 stack, smoke-check it, then measure dense
# vs IceCache through real servers (serve_gpu.py).
#   bash benchmarks/gpu/serve_gpu.sh [serve_gpu.py arguments]      (results and logs: $OUT, else benchmarks/results/gpu)
#   GPU_TESTS="tests/... -k ..." first runs those tests with the installed stack (GPU_TESTS_SECONDS, default 240)
# .whl/ (git-ignored, carried) holds: build_carry.sh's output, the trimmed flashinfer archive (README.md) and this
# project's wheel (pip wheel --no-deps -w .whl .), so the plugin's entry point (--enable-icecache) is installed.
set -uo pipefail
cd "$(dirname "$0")/../.."
R=${OUT:-benchmarks/results/gpu}
mkdir -p "$R" /tmp/site
T0=$(date +%s)
{
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  for t in .whl/*.tar.xz; do tar -xJf "$t" -C /tmp/site || exit 1; done
} > "$R/install.log" 2>&1 || { echo "INSTALL FAILED"; tail -40 "$R/install.log"; exit 1; }
python3 benchmarks/gpu/patch_sglang.py /tmp/site || exit 1
source benchmarks/gpu/sglang_env.sh
echo "installed in $(( $(date +%s) - T0 )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "cores $(nproc); $(free -g | awk '/Mem/{print $2}') GiB; /dev/shm $(df -h /dev/shm | awk 'NR==2{print $2}')"
python3 -c "import torch, sglang, sgl_kernel, flashinfer, icecache_sglang, importlib.metadata as m; print('torch', torch.__version__, 'sglang', sglang.__version__, 'sgl_kernel', sgl_kernel.__version__, 'flashinfer', flashinfer.__version__, 'plugins', [e.name for e in m.entry_points(group='sglang.srt.plugins')])" 2>&1 | tail -3
# FlashInfer's JIT build for IceCache's sparse decode runs on the CPU while the dense server uses the GPU
# and the indexer's numba functions compile (about 90 s on a bare machine) before the IceCache server needs them
( timeout 400 python3 benchmarks/gpu/prewarm_flashinfer.py > "$R/prewarm.log" 2>&1 & )
( timeout 400 python3 benchmarks/gpu/prewarm_indexer.py > "$R/prewarm-indexer.log" 2>&1 & )
if [ "${SMOKE:-1}" = 1 ]; then  # SMOKE=0 skips it (the server builds the same JIT kernels at its first requests)
  timeout 240 python3 benchmarks/gpu/smoke_sglang.py > "$R/smoke.log" 2>&1; echo "smoke exit $? after $(( $(date +%s) - T0 )) s"; tail -14 "$R/smoke.log"
fi
if [ -n "${GPU_TESTS:-}" ]; then  # e.g. GPU_TESTS="tests/test_server_graphs.py -k on_a_gpu": pytest with this stack
  timeout "${GPU_TESTS_SECONDS:-240}" python3 -m pytest -q -p no:cacheprovider $GPU_TESTS > "$R/gpu_tests.log" 2>&1
  echo "gpu tests exit $? after $(( $(date +%s) - T0 )) s"; tail -15 "$R/gpu_tests.log"
fi
LEFT=$(( ${SERVE_GPU_SECONDS:-300} - ($(date +%s) - T0) ))
# what every thread on the machine does, every 5 s (who holds the cores while a request waits)
( timeout "$LEFT" top -b -H -d 5 -w 200 2>/dev/null | awk '/^top -/{n=0} n++<28 {print; fflush()}' > "$R/top.log" & )
python3 benchmarks/gpu/serve_gpu.py --out "$R" --deadline-s "$LEFT" "$@" 2>&1 | grep -v "^RECORD" | tail -40
python3 - "$R/serve_gpu.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
           if k not in ("command", "device", "server_args", "output_ids", "trace", "log_tail", "icecache_config", "time", "token_times_s")})
    if r.get("log_tail"): print(r["log_tail"][-3000:])
PY
echo "prewarm: $(tail -2 "$R/prewarm.log") / $(tail -1 "$R/prewarm-indexer.log")"
echo "total $(( $(date +%s) - T0 )) s"
