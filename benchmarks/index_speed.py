"""Index speed on this machine's cores: build throughput, insert latency, and the query latency of one
decode step of one layer (all KV heads), next to an exhaustive scan of the same pages measured in the same
run on the same cores: ``scan`` scores every key of the index's own pages (each key read once per KV head
for all its query heads, parallel over page chunks) and takes the exact top pages with the index's GQA
merge; ``read`` only reads those keys once with the same layout, the floor of any exhaustive method.
Query, scan and read are interleaved step by step.

Memory: ``bytes_per_token_layer`` is what IceCache keeps on the host beyond SGLang's KV, per token and
layer: the index's allocated arrays (``nbytes()``) per token plus the key store's row (H_kv x d in the
model's dtype, bfloat16 for Llama-3.1-8B); ``key_bytes_per_token_layer`` is that key row alone.

OpenBLAS runs the indexer's thread count (one; ``--blas-threads 0``: NumPy's default, whose idle threads spin
on the cores numba's threads need: a 16-token insert at 32k took 8 ms instead of 0.8), recorded as
``blas_threads``.

Shape: Llama-3.1-8B attention (8 KV heads, 32 query heads, head_dim 128), low-rank "LLM-like" keys,
P = 12 pages of 16 tokens (the reference 256-token budget less 2 sink and 2 window pages).

    python benchmarks/index_speed.py --quick   # < 2 min
    python benchmarks/index_speed.py           # more repetitions
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_blas_threads, apply_blas_threads, plot_log_lines, png_path, write_records  # noqa: E402


import numba  # noqa: E402

from icecache_sglang.index.config import IndexConfig, QueryParams  # noqa: E402
from icecache_sglang.index.paged_index import PagedDCIIndex  # noqa: E402
from icecache_sglang.index.config import DEFAULT_GQA_MERGE  # noqa: E402
from icecache_sglang.index.scan import read_keys, scan_pages  # noqa: E402
from icecache_sglang.index.synthetic import lowrank_keys  # noqa: E402

H_KV, H_Q, D, P = 8, 32, 128, 12
MODEL_DTYPE, MODEL_ELEM_BYTES = "bfloat16", 2  # Llama-3.1-8B's KV dtype: the key store's rows


def scan_index(idx: PagedDCIIndex, Q: np.ndarray, n_pages: int, merge: str = DEFAULT_GQA_MERGE) -> np.ndarray:
    """The exact top ``n_pages`` pages per KV head by an exhaustive scan of the index's own pages (the
    server's default selection, with its GQA merge unless ``merge`` names another)."""
    return scan_pages(idx.page_keys, idx.page_fill, idx.next_page, Q, n_pages, merge=merge)


def read_index(idx: PagedDCIIndex) -> float:
    """Read every key the scan reads (the valid slots of the pages in use) once."""
    return read_keys(idx.page_keys, idx.next_page, idx.page_fill)




def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def plot(records, path: Path) -> None:
    labels = {"query": "IceCache query", "scan": "exhaustive scan (exact top pages)", "read": "read the keys once"}
    series = [(labels[op], style, [(r["context"], r["seconds_median"] * 1e3) for r in records
                                   if r["op"] == op and not r.get("non_default")])
              for op, style in (("query", "o-"), ("scan", "s--"), ("read", "^:"))]
    plot_log_lines(path, series, f"one decode step, one layer ({H_KV} KV / {H_Q} q heads, d={D}, P={P})",
                   "context tokens", "ms per decode step per layer")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--other-props", type=float, nargs="*", default=[0.8],
                    help="also time the search at these prop_to_retrieve values (non-default query records)")
    ap.add_argument("--key-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="how the index keeps keys (the server picks bfloat16 for bfloat16 KV caches)")
    add_blas_threads(ap)
    args = ap.parse_args(argv)
    blas = apply_blas_threads(args.blas_threads)
    contexts = [8192, 32768, 131072]
    reps = 7 if args.quick else 21
    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    records = []
    for n in contexts:
        K, Qs = lowrank_keys(rng, n + 512, D, rank=16, n_queries=reps, heads=H_KV, group=H_Q // H_KV)
        # the spec's projection layout, built and inserted into the same way first (build and insert records
        # with "layout": "projection"); then the default layout's index, which everything else is timed on
        cfg = IndexConfig(page_size=16, rebuild_growth=None, key_dtype=args.key_dtype)
        other = PagedDCIIndex(H_KV, D, config=replace(cfg, layout="projection"))
        idx = PagedDCIIndex(H_KV, D, config=cfg)
        n_builds = 1 if n > 32768 or args.quick else 3
        t_build_other = timed(lambda: other.build(K[:, :n]), n_builds)
        t_build = timed(lambda: idx.build(K[:, :n]), n_builds)
        batches = iter(range(n, n + 512, 16))
        t_insert_other = timed(lambda: other.insert(K[:, (s := next(batches)) : s + 16]), min(reps, 32))
        batches = iter(range(n, n + 512, 16))
        t_insert = timed(lambda: idx.insert(K[:, (s := next(batches)) : s + 16]), min(reps, 32))
        key_row = H_KV * D * MODEL_ELEM_BYTES
        tokens = idx.n_live
        fill = np.concatenate([idx.page_fill[h, : idx.next_page[h]] for h in range(H_KV)])
        base = {"context": n, "heads": H_KV, "q_heads": H_Q, "head_dim": D, "threads": threads, "blas_threads": blas,
                "page_size": 16,
                "tokens": tokens, "index_nbytes": idx.nbytes(), "model_dtype": MODEL_DTYPE,
                "key_bytes_per_token_layer": key_row, "bytes_per_token_layer": idx.nbytes() / tokens + key_row,
                "page_keys_dtype": str(idx.page_keys.dtype), "pages_in_use": int(fill.size),
                "pages_with_tokens": int((fill > 0).sum()),
                "scanned_key_bytes": int(fill.sum()) * D * idx.page_keys.itemsize}
        idx.query(Qs[0], P)  # warm (and compile)
        scan_index(idx, Qs[0], P)
        read_index(idx)
        t_query, t_scan, t_read, t_scan_rank = [], [], [], []
        t_alt = {prop: [] for prop in args.other_props}
        for q in Qs:  # interleaved: all see the same machine state
            t_query += timed(lambda q=q: idx.query(q, P, merge=DEFAULT_GQA_MERGE), 1)
            for prop in args.other_props:
                t_alt[prop] += timed(lambda q=q, prop=prop: idx.query(q, P, QueryParams(prop_to_retrieve=prop),
                                                                      merge=DEFAULT_GQA_MERGE), 1)
            t_scan += timed(lambda q=q: scan_index(idx, q, P), 1)
            t_scan_rank += timed(lambda q=q: scan_index(idx, q, P, "rank"), 1)
            t_read += timed(lambda: read_index(idx), 1)
        b, ins = float(np.median(t_build)), float(np.median(t_insert))
        tq, ts, tr = (float(np.median(t)) for t in (t_query, t_scan, t_read))
        records += [
            {**base, "op": "build", "seconds_median": b, "rate": n * H_KV / b, "rate_unit": "token-heads/s",
             "layout": cfg.layout},
            {**base, "op": "insert", "batch": 16, "seconds_median": ins, "rate": 16 * H_KV / ins,
             "rate_unit": "token-heads/s", "layout": cfg.layout},
            *({**base, "op": op, "seconds_median": float(np.median(t)), "rate": w * H_KV / float(np.median(t)),
               "rate_unit": "token-heads/s", "layout": "projection", "non_default": True,
               **({"batch": 16} if op == "insert" else {})}
              for op, t, w in (("build", t_build_other, n), ("insert", t_insert_other, 16))),
            {**base, "op": "query", "pages": P, "seconds_median": tq, "rate": 1 / tq, "rate_unit": "steps/s",
             "speedup_vs_scan": ts / tq, "prop_to_retrieve": QueryParams().prop_to_retrieve, "fov": QueryParams().fov_for(n),
             "gqa_merge": DEFAULT_GQA_MERGE},
            *({**base, "op": "query", "pages": P, "seconds_median": float(np.median(t)), "rate": 1 / float(np.median(t)),
               "rate_unit": "steps/s", "speedup_vs_scan": ts / float(np.median(t)), "prop_to_retrieve": prop,
               "fov": QueryParams().fov_for(n), "non_default": True} for prop, t in t_alt.items()),
            {**base, "op": "scan", "pages": P, "seconds_median": ts, "rate": 1 / ts, "rate_unit": "steps/s",
             "scan_over_read": ts / tr, "gqa_merge": DEFAULT_GQA_MERGE},
            {**base, "op": "scan", "pages": P, "seconds_median": float(np.median(t_scan_rank)),
             "rate": 1 / float(np.median(t_scan_rank)), "rate_unit": "steps/s",
             "scan_over_read": float(np.median(t_scan_rank)) / tr, "gqa_merge": "rank", "non_default": True},
            {**base, "op": "read", "seconds_median": tr, "rate": base["scanned_key_bytes"] / tr,
             "rate_unit": "bytes/s"},
        ]
        print(f"n={n:7d}: build {b:6.2f} s ({n * H_KV / b / 1e6:.2f} M token-heads/s; projection layout "
              f"{np.median(t_build_other):6.2f} s), insert(16) {ins * 1e3:6.2f} ms (projection "
              f"{np.median(t_insert_other) * 1e3:6.2f} ms), "
              f"query {tq * 1e3:6.2f} ms ("
              + ", ".join(f"prop {p}: {np.median(t) * 1e3:.2f} ms" for p, t in t_alt.items())
              + f"), scan {ts * 1e3:6.2f} ms (rank merge {np.median(t_scan_rank) * 1e3:6.2f} ms), "
              f"read {tr * 1e3:6.2f} ms "
              f"({base['scanned_key_bytes'] / tr / 1e9:.1f} GB/s), query speed-up vs scan {ts / tq:.2f}x, "
              f"scan/read {ts / tr:.2f}, {base['bytes_per_token_layer']:.0f} B per token-layer "
              f"(key row {key_row} B)", flush=True)
    path = write_records("index_speed", args.quick, records)
    plot(records, png_path("index_speed", args.quick))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
