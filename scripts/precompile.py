"""Fill numba's on-disk cache for the index's kernels, one key type per process, processes side by side.

numba compiles a kernel once per argument type, and the index keeps its page rows in one of three types
(int8 rows: the server's default over float32/bfloat16 KV; float32: the library's default, most unit tests;
bfloat16 bits: the server's choice over float16 KV). A cold cache therefore costs three compiles of the whole
index, about 2 minutes each on the 2-core CI machine (128 s for the int8 one), one after the other wherever
the suite first meets them. This runs the indexer's own warmup (every request kind it answers,
``IndexerService.warmup``) once per key type, in parallel processes, so that the suite loads from the cache.
Whatever it does not reach is compiled where it is first used, as without it, so it can only save time; a
failure here is printed and left to the tests.

    python scripts/precompile.py [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from multiprocessing import get_context

# (KV cache dtype, index key dtype), the costliest first: each is one process. (The bfloat16-keys unit runs
# over bfloat16 KV: the kernels see the same uint16 rows as over float16 KV, which numba cannot read.)
UNITS = (("bfloat16", "int8"), ("float32", "float32"), ("bfloat16", "bfloat16"))


def _serialise_cache_writes(lock_path: str) -> None:
    """numba adds a compiled specialization to a function's cache index by reading the index, picking the
    next free data file and writing both back, with no lock: two processes saving different specializations
    of one function at once could both take data file N and leave the index naming the other's code. The
    units compile the same functions at the same pace, so their saves take turns under one file lock. Once
    per process: a worker runs more than one unit (a second wrapper would wait for its own lock)."""
    import fcntl

    from numba.core import caching

    save = caching.IndexDataCacheFile.save
    if getattr(save, "serialised", False):
        return

    def locked_save(self, key, data):
        with open(lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            return save(self, key, data)  # closing the file releases the lock

    locked_save.serialised = True
    caching.IndexDataCacheFile.save = locked_save


def warm(kv_dtype: str, key_dtype: str, lock_path: str) -> float:
    _serialise_cache_writes(lock_path)
    import numpy as np

    from icecache_sglang.index.keys import to_storage
    from icecache_sglang.indexer.config import IndexerConfig
    from icecache_sglang.indexer.keystore import KeyStore
    from icecache_sglang.indexer.service import IndexerService
    from icecache_sglang.runtime.config import IceCacheConfig

    t0 = time.perf_counter()
    H, d = 2, 64
    rows = np.random.default_rng(0).standard_normal((1, 8, H, d)).astype(np.float32)
    store = KeyStore.scratch(to_storage(rows, kv_dtype), kv_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = IndexerConfig(rank=0, store=store.spec, endpoint=f"ipc://{tmp}/s", private_dir=tmp,
                            index=replace(IceCacheConfig().index_config(), key_dtype=key_dtype))
        svc = IndexerService(cfg, store)
        try:
            svc.warmup()  # on its own scratch store of the spec's dtype and size (IndexerService.warmup)
        finally:
            svc.close()
            store.close()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="processes side by side (at most one per unit)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, \
            ProcessPoolExecutor(max(1, min(args.jobs, len(UNITS))), mp_context=get_context("spawn")) as pool:
        lock = os.path.join(tmp, "numba-cache.lock")
        futures = {pool.submit(warm, kv, key, lock): (kv, key) for kv, key in UNITS}
        for f in as_completed(futures):
            kv, key = futures[f]
            try:
                print(f"precompile: {key} index keys over {kv} KV: {f.result():.0f} s", flush=True)
            except Exception as e:  # noqa: BLE001 - the tests will meet it properly
                print(f"precompile: {key} index keys over {kv} KV failed: {e!r}", file=sys.stderr, flush=True)
    print(f"precompile: {time.perf_counter() - t0:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
