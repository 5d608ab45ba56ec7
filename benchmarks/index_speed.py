"""Index speed on this machine's cores: build throughput, insert latency, and the query latency of one
decode step of one layer (all KV heads), each next to brute-force exact scoring + top-k pages measured in
the same run on the same cores and the same page layout.

Shape: Llama-3.1-8B attention (8 KV heads, 32 query heads, head_dim 128), low-rank "LLM-like" keys,
P = 12 pages of 16 tokens (the reference 256-token budget less 2 sink and 2 window pages).

    python benchmarks/index_speed.py --quick   # < 2 min
    python benchmarks/index_speed.py           # more repetitions
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, write_records  # noqa: E402

import numba  # noqa: E402

from icecache_sglang.index.config import IndexConfig  # noqa: E402
from icecache_sglang.index.paged_index import PagedDCIIndex  # noqa: E402
from icecache_sglang.index.search import merge_group_pages  # noqa: E402
from icecache_sglang.index.synthetic import lowrank_keys  # noqa: E402

H_KV, H_Q, D, P = 8, 32, 128, 12


def bruteforce_pages(idx: PagedDCIIndex, Q: np.ndarray, n_pages: int) -> np.ndarray:
    """Exact scores of every token (one matmul per KV head over its physical pages), the max per page,
    the top pages per query head and the same GQA merge as the index."""
    g = Q.shape[0] // idx.H
    rows = np.empty((Q.shape[0], n_pages), np.int32)
    for h in range(idx.H):
        npg = int(idx.next_page[h])
        s = (idx.page_keys[h, :npg].reshape(-1, idx.d) @ Q[h * g : (h + 1) * g].T).reshape(npg, idx.C, g)
        s[np.arange(idx.C)[None, :] >= idx.page_fill[h, :npg, None]] = -np.inf  # empty slots and free pages
        best = s.max(axis=1).T  # [g, pages]
        top = np.argpartition(-best, n_pages - 1, axis=1)[:, :n_pages]
        order = np.argsort(-np.take_along_axis(best, top, axis=1), axis=1, kind="stable")
        rows[h * g : (h + 1) * g] = np.take_along_axis(top, order, axis=1)
    return merge_group_pages(rows, g, n_pages)


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for op, style in (("query", "o-"), ("bruteforce", "s--")):
        pts = sorted((r["context"], r["seconds_median"] * 1e3) for r in records if r["op"] == op)
        ax.plot(*zip(*pts), style, label=f"{op} (one layer, {H_KV} KV / {H_Q} q heads)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("ms per decode step per layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    contexts = [8192, 32768, 131072]
    reps = 7 if args.quick else 21
    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    records = []
    for n in contexts:
        K, Qs = lowrank_keys(rng, n + 512, D, rank=16, n_queries=reps, heads=H_KV, group=H_Q // H_KV)
        idx = PagedDCIIndex(H_KV, D, config=IndexConfig(page_size=16, rebuild_growth=None))
        t_build = timed(lambda: idx.build(K[:, :n]), 1 if n > 32768 or args.quick else 3)
        batches = iter(range(n, n + 512, 16))
        t_insert = timed(lambda: idx.insert(K[:, (s := next(batches)) : s + 16]), min(reps, 32))
        idx.query(Qs[0], P)  # warm
        t_query = [timed(lambda q=q: idx.query(q, P), 1)[0] for q in Qs]
        t_bf = [timed(lambda q=q: bruteforce_pages(idx, q, P), 1)[0] for q in Qs]
        base = {"context": n, "heads": H_KV, "q_heads": H_Q, "head_dim": D, "threads": threads, "page_size": 16}
        b = float(np.median(t_build))
        records += [
            {**base, "op": "build", "seconds_median": b, "rate": n * H_KV / b, "rate_unit": "token-heads/s"},
            {**base, "op": "insert", "batch": 16, "seconds_median": float(np.median(t_insert)),
             "rate": 16 * H_KV / float(np.median(t_insert)), "rate_unit": "token-heads/s"},
            {**base, "op": "query", "pages": P, "seconds_median": float(np.median(t_query)),
             "rate": 1 / float(np.median(t_query)), "rate_unit": "steps/s"},
            {**base, "op": "bruteforce", "pages": P, "seconds_median": float(np.median(t_bf)),
             "rate": 1 / float(np.median(t_bf)), "rate_unit": "steps/s"},
        ]
        speedup = np.median(t_bf) / np.median(t_query)
        records[-2]["speedup_vs_bruteforce"] = float(speedup)
        print(f"n={n:7d}: build {b:6.2f} s ({n * H_KV / b / 1e6:.2f} M token-heads/s), "
              f"insert(16) {np.median(t_insert) * 1e3:6.2f} ms, query {np.median(t_query) * 1e3:6.2f} ms, "
              f"brute force {np.median(t_bf) * 1e3:6.2f} ms, speed-up {speedup:.2f}x", flush=True)
    path = write_records("index_speed", args.quick, records)
    plot(records, png_path("index_speed", args.quick))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
