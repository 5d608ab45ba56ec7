"""The build's cost when level-0 parents are searched within runs of the prompt (``IndexConfig.parent_segment``).

A build gives every level-0 token its exact ``D_kk`` nearest level-1 token (``index/transform.py``). Over the
whole prompt that is a float32 BLAS product of ``n x n p0 x (d+1)`` multiply-adds per head, quadratic in the
prompt: 50-55 % of a 128k layer's build on this machine, and on the GPU host's slower cores 40-54 s of a
128k prompt's 32 layers (``benchmarks/results/gpu/blas_threads``). Within runs of ``S`` tokens of the build
order it is ``n x S p0 x (d+1)``, linear in the prompt.

Per context: one layer of 8 KV heads x 128 dims of low-rank keys, the indexer's index settings (int8 keys, the
bisect layout, no values), built with ``parent_segment`` None (the whole prompt) and each run length, interleaved,
median of ``--reps``; ``parent_madds`` is the level-0 search's multiply-adds (computed from the level counts,
not measured). What the runs cost in page quality is ``page_layout.py``'s ``icecache_segS`` layouts. OpenBLAS
runs on the indexer's thread count (``IndexerConfig.blas_threads``, one; ``--blas-threads 0``: NumPy's
default, every core), recorded as ``blas_threads``; a build of 16384+ tokens searches its heads' parents side by
side on numba's threads.

    python benchmarks/parent_segments.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_blas_threads, apply_blas_threads, plot_log_lines, png_path, write_records  # noqa: E402

from icecache_sglang.index.config import IndexConfig  # noqa: E402
from icecache_sglang.index.paged_index import PagedDCIIndex  # noqa: E402
from icecache_sglang.index.schedule import schedule_levels  # noqa: E402
from icecache_sglang.index.synthetic import lowrank_keys  # noqa: E402
from icecache_sglang.index.transform import segment_bounds  # noqa: E402

H, D = 8, 128


def parent_madds(n: int, segment: int | None, p0: float, p_up: float) -> int:
    """Multiply-adds of the level-0 parent search of one head (``(d+1)`` per child-parent pair)."""
    level = schedule_levels(n, p0, p_up)
    total = 0
    b = segment_bounds(n, segment)
    for lo, hi in zip(b[:-1], b[1:]):
        run = level[lo:hi]
        kids, ups = int((run == 0).sum()), int((run == 1).sum())
        total += kids * (ups or int((level == 1).sum())) * (D + 1)
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8k and 32k, one repetition")
    ap.add_argument("--contexts", type=int, nargs="+")
    ap.add_argument("--segments", type=int, nargs="+", default=[16384, 8192, 4096])
    ap.add_argument("--reps", type=int, default=3)
    add_blas_threads(ap)
    a = ap.parse_args(argv)
    blas = apply_blas_threads(a.blas_threads)
    contexts = a.contexts or ([8192, 32768] if a.quick else [8192, 32768, 131072])
    reps = 1 if a.quick else a.reps
    settings = [None] + a.segments
    records = []
    for n in contexts:
        K = lowrank_keys(np.random.default_rng(n), n, D, heads=H)[0]
        cfgs = {s: IndexConfig(page_size=16, key_dtype="int8", rebuild_growth=None, parent_segment=s) for s in settings}
        for cfg in cfgs.values():  # compiled and warm before timing
            PagedDCIIndex(H, D, config=cfg).build(K[:, :4096])
        times = {s: [] for s in settings}
        for _ in range(reps):
            for s, cfg in cfgs.items():
                idx = PagedDCIIndex(H, D, config=cfg)  # keys only, as the indexer's (values stay in SGLang's pool)
                t = time.perf_counter()
                idx.build(K)
                times[s].append(time.perf_counter() - t)
        whole = statistics.median(times[None])
        cfg0 = cfgs[None]
        for s in settings:
            med = statistics.median(times[s])
            rec = {"context": n, "parent_segment": s, "build_s": round(med, 4), "build_s_all": [round(x, 4) for x in times[s]],
                   "speedup_vs_whole": round(whole / med, 3), "tokens_per_s": round(n / med, 1),
                   "parent_madds_per_head": parent_madds(n, s, cfg0.level0_prob, cfg0.p_up), "kv_heads": H,
                   "head_dim": D, "key_dtype": "int8", "layout": cfg0.layout, "reps": reps, "blas_threads": blas}
            records.append(rec)
            print(rec, flush=True)
    path = write_records("parent_segments", a.quick, records)
    series = [(f"parent_segment {s}", "o-", [(r["context"], r["build_s"]) for r in records if r["parent_segment"] == s])
              for s in settings]
    plot_log_lines(png_path("parent_segments", a.quick), series,
                   "one layer's build (8 KV heads, int8 keys), measured", "prompt tokens", "seconds")
    print("wrote", path)


if __name__ == "__main__":
    main()
