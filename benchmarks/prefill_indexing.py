"""What indexing a chunked prefill costs the indexer: one Build of the whole prompt against a Build of the
first chunk followed by one Insert per later chunk (what the backend did until it deferred a request's first
index to its first decode step), for one layer of 8 KV heads x 128 dims, on this machine's cores, with the
server's index settings (``IceCacheConfig().index_config()``: bfloat16 keys, rebuilds as the index grows).

SGLang prefills long prompts in chunks (``--chunked-prefill-size``, 8192 by default on a GPU); each
anchor layer's indexing work repeats per layer, so ``model_seconds`` multiplies the measured per-layer
time by 30 anchor layers (Llama-3.1-8B with 2 dense layers): a computed figure, not a measured one.
The two ways are interleaved per repetition on the same keys (low-rank keys, ``index/synthetic.py``).

    python benchmarks/prefill_indexing.py --quick     # 8k, 32k, 64k: ~1 min on 2 cores
    python benchmarks/prefill_indexing.py             # and 128k, 3 repetitions
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import plot_log_lines, png_path, replot, write_records  # noqa: E402

import numba  # noqa: E402

from icecache_sglang.index.paged_index import PagedDCIIndex  # noqa: E402
from icecache_sglang.index.synthetic import lowrank_keys  # noqa: E402
from icecache_sglang.runtime.config import IceCacheConfig  # noqa: E402

H_KV, D, CHUNK, ANCHORS = 8, 128, 8192, 30
NAME = "prefill_indexing"


def index_one_build(K: np.ndarray, cfg) -> tuple[float, PagedDCIIndex]:
    t = time.perf_counter()
    idx = PagedDCIIndex(H_KV, D, config=cfg)
    idx.build(K)
    return time.perf_counter() - t, idx


def index_per_chunk(K: np.ndarray, cfg) -> tuple[float, PagedDCIIndex]:
    t = time.perf_counter()
    idx = PagedDCIIndex(H_KV, D, config=cfg)
    idx.build(K[:, :CHUNK])
    for s in range(CHUNK, K.shape[1], CHUNK):
        idx.insert(K[:, s: s + CHUNK])
    return time.perf_counter() - t, idx


WAYS = {"one_build": index_one_build, "build_then_insert_per_chunk": index_per_chunk}


def plot(records, path: Path) -> None:
    r0 = records[0]
    series = [(way.replace("_", " "), style, [(r["context"], r["seconds_median"]) for r in records if r["way"] == way])
              for way, style in (("one_build", "o-"), ("build_then_insert_per_chunk", "s--"))]
    plot_log_lines(path, series, f"indexing one layer of a chunked prefill ({H_KV} KV heads, d={D}, chunks of "
                   f"{CHUNK});\nmeasured, {r0['threads']} threads: {r0['machine'][:60]}", "prompt tokens",
                   "seconds per layer", figsize=(6, 3.8), title_size=8)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--replot", action="store_true")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(NAME, plot)
    contexts = [8192, 32768, 65536] + ([] if args.quick else [131072])
    reps = 1 if args.quick else 3
    cfg = IceCacheConfig().index_config()
    rng = np.random.default_rng(0)
    K0, _ = lowrank_keys(rng, 2048, D, rank=16, n_queries=1, heads=H_KV)
    for way in WAYS.values():  # compile outside the timings
        way(K0, cfg)
    records = []
    for n in contexts:
        K, _ = lowrank_keys(rng, n, D, rank=16, n_queries=1, heads=H_KV)
        times = {w: [] for w in WAYS}
        rebuilds = {}
        for rep in range(reps):
            for w in (list(WAYS) if rep % 2 == 0 else list(WAYS)[::-1]):
                t, idx = WAYS[w](K, cfg)
                times[w].append(t)
                rebuilds[w] = idx.rebuilds
                assert idx.n_live == n
        for w, ts in times.items():
            s = float(np.median(ts))
            records.append({"context": n, "chunk": CHUNK, "heads": H_KV, "head_dim": D, "way": w,
                            "threads": numba.get_num_threads(), "reps": reps, "seconds": ts, "seconds_median": s,
                            "rebuilds": rebuilds[w], "model_seconds_computed": s * ANCHORS,
                            "slowdown_vs_one_build": s / float(np.median(times["one_build"]))})
            print(f"{n:>7} {w:<28} {s:7.2f} s/layer  x{records[-1]['slowdown_vs_one_build']:.1f}  "
                  f"rebuilds {rebuilds[w]}", flush=True)
    path = write_records(NAME, args.quick, records)
    plot(json.loads(path.read_text()), png_path(NAME, args.quick))


if __name__ == "__main__":
    main()
