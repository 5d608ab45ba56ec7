"""The exact top pages without the index's key copy: ``scan_pages`` over the index's page-ordered keys vs
``scan_store`` over the key store (SGLang's pool layout ``[slots, H_kv, d]``) in token order, measured
interleaved in one run on the same cores, beside the time to merely read the store's keys once.

Issue 14's memory goal asks for one host copy of the keys. The server's KV pool already is the indexer's
key store (``runtime/pool/kv_pool.py``); what remains is the index's own copy in page order
(``page_keys``), which the tree search reads. If the exact selection (the server's default) scans the
store as fast as the page copy, that copy is only needed for ``selection: icecache``. Records:

- ``op: scan_pages`` / ``scan_store`` (slots contiguous, as SGLang allocates one long prompt) /
  ``scan_store_shuffled`` (slots in random order: the worst case after much allocator churn) / ``read_store``;
- ``index_bytes_per_token_layer`` (allocated: every index array) and
  ``index_bytes_without_page_keys_per_token_layer`` (computed: the same less ``page_keys``), beside
  ``key_bytes_per_token_layer`` (the model's bfloat16 key row, 8 x 128 x 2).

Shape as ``index_speed.py``: 8 KV heads, 32 query heads, head_dim 128, low-rank keys, 12 pages of 16.

    python benchmarks/store_scan.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, write_records  # noqa: E402

import numba  # noqa: E402
from numba import njit, prange  # noqa: E402

from icecache_sglang.index.config import IndexConfig  # noqa: E402
from icecache_sglang.index.keys import as_f32, to_storage  # noqa: E402
from icecache_sglang.index.paged_index import PagedDCIIndex  # noqa: E402
from icecache_sglang.index.scan import scan_pages  # noqa: E402
from icecache_sglang.index.scan_store import scan_index_store, scan_store  # noqa: E402
from icecache_sglang.index.synthetic import lowrank_keys  # noqa: E402

NAME = "store_scan"
H_KV, H_Q, D, P = 8, 32, 128, 12


@njit(cache=True, parallel=True, fastmath=True)
def _read_store(store, slots, n_tok, n_blocks):  # pragma: no cover - compiled
    """Read the store's rows of every token once, with ``scan_store``'s layout (runs of tokens, a slot's
    rows of all KV heads contiguous), and return their sum: the floor of a store-order scan."""
    H, d = store.shape[1], store.shape[2]
    part = np.zeros(n_blocks, np.float32)
    per = (n_tok + n_blocks - 1) // n_blocks
    for blk in prange(n_blocks):
        scratch = np.empty(H * d, np.float32)
        s = np.float32(0.0)
        for t in range(blk * per, min((blk + 1) * per, n_tok)):
            k = as_f32(store[slots[t]].reshape(H * d), H * d, scratch)
            for i in range(H * d):
                s += k[i]
        part[blk] = s
    return part.sum()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    reps = 7 if args.quick else 21
    rng = np.random.default_rng(0)
    records = []
    for n in (8192, 32768, 131072):
        K, Qs = lowrank_keys(rng, n, D, rank=16, n_queries=reps, heads=H_KV, group=H_Q // H_KV)
        slots = np.arange(1, n + 1, dtype=np.int64)  # one prompt's slots, as SGLang hands them out
        idx = PagedDCIIndex(H_KV, D, config=IndexConfig(page_size=16, rebuild_growth=None, key_dtype="bfloat16"))
        idx.build(K, positions=slots)
        store = np.zeros((n + 1, H_KV, D), np.uint16)
        store[slots] = to_storage(K.transpose(1, 0, 2).reshape(-1, D), "bfloat16").reshape(n, H_KV, D)
        shuffled = rng.permutation(slots)  # the same tokens, their rows scattered over the store
        store_sh = np.zeros_like(store)
        store_sh[shuffled] = store[slots]

        def f_pages(q):
            return scan_pages(idx.page_keys, idx.page_fill, idx.next_page, q, P)

        def f_store(q):
            return scan_index_store(idx, store, q, P)

        def f_store_sh(q):  # token t lives at row shuffled[t]
            return scan_store(store_sh, shuffled, idx.tok_page, idx.alive, n, idx.page_fill, idx.next_page, q, P)

        def f_read():
            return _read_store(store, slots, n, numba.get_num_threads())

        for q in Qs[:1]:  # compile, and the three agree
            a, b, c = f_pages(q), f_store(q), f_store_sh(q)
            assert np.array_equal(a, b) and np.array_equal(a, c), "the scans disagree"
        f_read()
        t = {k: [] for k in ("scan_pages", "scan_store", "scan_store_shuffled", "read_store")}
        for q in Qs:  # interleaved
            t["scan_pages"].append(timed(lambda q=q: f_pages(q)))
            t["scan_store"].append(timed(lambda q=q: f_store(q)))
            t["scan_store_shuffled"].append(timed(lambda q=q: f_store_sh(q)))
            t["read_store"].append(timed(f_read))
        tokens = idx.n_live
        base = {"context": n, "heads": H_KV, "q_heads": H_Q, "head_dim": D, "page_size": 16, "pages": P,
                "threads": numba.get_num_threads(), "key_dtype": "bfloat16",
                "key_bytes_per_token_layer": H_KV * D * 2,
                "index_bytes_per_token_layer": idx.nbytes() / tokens,
                "index_bytes_without_page_keys_per_token_layer": (idx.nbytes() - idx.page_keys.nbytes) / tokens,
                "store_key_bytes": n * H_KV * D * 2}
        for op, ts in t.items():
            med = float(np.median(ts))
            rec = {**base, "op": op, "seconds_median": med}
            if op == "read_store":
                rec["gb_per_s"] = base["store_key_bytes"] / med / 1e9
            print(f"{n:7d} {op:20s} {med * 1e3:8.2f} ms", flush=True)
            records.append(rec)
        print(f"{n:7d} index {base['index_bytes_per_token_layer']:.0f} B/token-layer, without page_keys "
              f"{base['index_bytes_without_page_keys_per_token_layer']:.0f}, key row {base['key_bytes_per_token_layer']}",
              flush=True)
    out = write_records(NAME, args.quick, records)
    plot(json.loads(out.read_text()), png_path(NAME, args.quick))
    print(f"wrote {out}")


def plot(records, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ops = {"scan_pages": "scan of the index's page copy", "scan_store": "scan of the store (token order)",
           "scan_store_shuffled": "scan of the store (shuffled slots)", "read_store": "read the store once"}
    for op, label in ops.items():
        rs = sorted((r for r in records if r["op"] == op), key=lambda r: r["context"])
        axes[0].plot([r["context"] for r in rs], [r["seconds_median"] * 1e3 for r in rs], "o-", label=label)
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("context (tokens)")
    axes[0].set_ylabel("ms per decode step, one layer (median)")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    rs = sorted((r for r in records if r["op"] == "scan_pages"), key=lambda r: r["context"])
    xs = range(len(rs))
    axes[1].bar([x - 0.2 for x in xs], [r["index_bytes_per_token_layer"] for r in rs], 0.4, label="index (allocated)")
    axes[1].bar([x + 0.2 for x in xs], [r["index_bytes_without_page_keys_per_token_layer"] for r in rs], 0.4,
                label="index less its key copy (computed)")
    axes[1].axhline(rs[0]["key_bytes_per_token_layer"], color="k", ls="--", label="the keys (bf16 row)")
    axes[1].axhline(1.25 * rs[0]["key_bytes_per_token_layer"], color="r", ls=":", label="issue 14 goal: 1.25x")
    axes[1].set_xticks(list(xs), [f"{r['context'] // 1024}k" for r in rs])
    axes[1].set_ylabel("host bytes per token and layer beyond SGLang's KV")
    axes[1].legend(fontsize=8)
    r0 = records[0]
    fig.suptitle(f"{r0['machine']}; {r0['command']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
