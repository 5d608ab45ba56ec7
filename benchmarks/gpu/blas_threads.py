"""How the indexer should drive OpenBLAS on the GPU host's cores (issue 14/17: a 128k prompt's 32-layer index
took > 100 s on 16 cores in attempt10, with OpenBLAS's 15 pool threads at 70-87 % and the write workers at 26-60 %).

The build's dominant cost at 128k is the exact level-0 parents: per KV head, augmented keys [8192, 129] @
[129, n/100] in float32 chunks, then an argmax per row (``index/transform.py: exact_parents``). This times that
work alone (numpy only, no numba, no compile) for ``--layers`` layers of 8 KV heads at ``--tokens`` tokens:

- ``main``: one thread, OpenBLAS's default thread count (every core);
- ``workers=W``: W threads each building whole layers (the indexer's write workers), OpenBLAS default;
- ``workers=W blas=1``: the same with OpenBLAS at one thread (``OPENBLAS_NUM_THREADS=1``, a subprocess);
- ``workers=W blas=local1``: each worker sets OpenBLAS to one thread for itself (``openblas_set_num_threads_local``).

    python benchmarks/gpu/blas_threads.py [--tokens 131072] [--layers 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def layer_job(seed: int, n: int, heads: int = 8, d: int = 128, chunk: int = 8192) -> float:
    rng = np.random.default_rng(seed)
    n_up = max(1, n // 100)
    checksum = 0.0
    parents_t = rng.standard_normal((d + 1, n_up), dtype=np.float32)
    children = rng.standard_normal((chunk, d + 1), dtype=np.float32)  # made once: time the matmul + argmax
    for _ in range(heads):
        for s in range(0, n, chunk):
            checksum += float(np.argmax(children[: min(chunk, n - s)] @ parents_t, axis=1)[0])
    return checksum


def run_variant(workers: int, n: int, layers: int, local: int = 0) -> float:
    layer_job(0, 16384)  # warm BLAS's pool
    setter = None
    if local:  # each worker sets a thread-local OpenBLAS thread count (what the indexer's workers would do)
        import ctypes
        setter = ctypes.CDLL(openblas_symbols()["libs"][0]).openblas_set_num_threads_local
    t = time.perf_counter()
    if workers <= 1:
        for i in range(layers):
            layer_job(i, n)
    else:
        with ThreadPoolExecutor(workers) as ex:
            def job(i):
                if setter is not None:
                    setter(local)
                return layer_job(i, n)
            list(ex.map(job, range(layers)))
    return time.perf_counter() - t


def openblas_symbols() -> dict:
    """The OpenBLAS numpy loaded, and whether it can set a thread-local thread count."""
    import ctypes
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and line.rstrip().endswith(".so")})
    out = {"libs": libs}
    for lib in libs:
        h = ctypes.CDLL(lib)
        out[lib] = {name: hasattr(h, name) for name in (
            "openblas_set_num_threads_local", "openblas_set_num_threads", "scipy_openblas_set_num_threads64_")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=4, type=int, metavar=("WORKERS", "TOKENS", "LAYERS", "LOCAL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps({"seconds": run_variant(*a.one)}))
        return
    cores = os.cpu_count() or 1
    records = []
    print(json.dumps({"openblas": openblas_symbols()}), flush=True)
    for workers in sorted({1, min(8, cores), cores}):
        for blas in ((None,) if workers == 1 else (None, 1, "local1")):
            env = dict(os.environ)
            if blas == 1:
                env["OPENBLAS_NUM_THREADS"] = "1"
            local = "1" if blas == "local1" else "0"
            out = subprocess.run([sys.executable, __file__, "--one", str(workers), str(a.tokens), str(a.layers), local],
                                 env=env, capture_output=True, text=True, check=True).stdout
            s = json.loads(out.strip().splitlines()[-1])["seconds"]
            n_up = max(1, a.tokens // 100)
            gflop = 2 * a.tokens * n_up * 129 * 8 * a.layers / 1e9
            rec = {"workers": workers, "openblas_threads": blas or "default", "tokens": a.tokens,
                   "layers": a.layers, "seconds": round(s, 3), "gflops": round(gflop / s, 1),
                   "cores": cores, "machine": platform.node(), "numpy": np.__version__}
            records.append(rec)
            print(json.dumps(rec), flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "blas_threads.json"), "w") as f:
            json.dump({"command": " ".join(sys.argv), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
