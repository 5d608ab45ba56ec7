"""The host cost of one anchor layer's decode plan: the full layout against the compact one.

A planner lays out, per anchor layer and step, which KV rows each (request, KV head) attends. For the
torch path it makes the full ``slots [B, H, T]`` / ``valid`` arrays and derives FlashInfer's compact form
(offsets and a row list) from them; for FlashInfer alone (the GPU path) it now lays out only the compact
form, and the rows of requests that attend to every token (within the budget, or dense while their index is
built or their first selections are fetched) once per step (``runtime/plan.py``: ``full_layout`` +
derivation vs ``compact_layout``). Measured: wall time of one layer's layout on the host, median of
interleaved repeats, for batches mixing sparse requests (sink 32 + 12 pages of 16 with 20 % padding + a
32-token tail, per KV head) with requests attending to all their tokens, 8 KV heads.

    python benchmarks/decode_plan_layout.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, write_records  # noqa: E402

from icecache_sglang.runtime.plan import compact_layout, compact_of, full_layout  # noqa: E402

H = 8


def case(rng, batch: int, dense: int, context: int):
    fixed, picked = [], {}
    for b in range(batch):
        row = rng.permutation(4 * context)[:context].astype(np.int64)
        if b < dense:
            fixed.append((row, row[:0]))
            continue
        fixed.append((row[:32], row[-32:]))
        p = rng.permutation(4 * context)[: H * 192].reshape(H, 192).astype(np.int64)
        p[rng.random(p.shape) < 0.2] = -1
        picked[b] = p
    return fixed, picked


def full(fixed, picked):
    """What ``Planner.plan`` does for the torch path (and did for FlashInfer): the full layout, then its
    compact form derived."""
    slots, valid = full_layout(fixed, picked, H)
    slots[~valid] = 0
    return compact_of(slots, valid, H)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    reps = 5 if a.quick else 15
    grid = [(1, 0, 32768), (1, 0, 131072), (8, 0, 32768), (8, 4, 32768), (8, 1, 131072), (8, 4, 131072)]
    if a.quick:
        grid = grid[:4]
    rng = np.random.default_rng(0)
    records = []
    for batch, dense, context in grid:
        fixed, picked = case(rng, batch, dense, context)
        t_full, t_compact, t_cached = [], [], []
        for _ in range(reps):
            t = time.perf_counter()
            ref = full(fixed, picked)
            t_full.append(time.perf_counter() - t)
            cache: dict = {}
            t = time.perf_counter()
            got = compact_layout(fixed, picked, H, cache)  # the step's first anchor layer: makes the dense rows
            t_compact.append(time.perf_counter() - t)
            t = time.perf_counter()
            compact_layout(fixed, picked, H, cache)  # every later anchor layer of the step
            t_cached.append(time.perf_counter() - t)
            assert all(np.array_equal(x, y) for x, y in zip(ref, got))
        r = {"batch": batch, "dense_requests": dense, "context": context, "kv_heads": H,
             "full_ms": 1e3 * float(np.median(t_full)), "compact_first_layer_ms": 1e3 * float(np.median(t_compact)),
             "compact_later_layers_ms": 1e3 * float(np.median(t_cached))}
        records.append(r)
        print(r, flush=True)
    path = write_records("decode_plan_layout", a.quick, records)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [f"B{r['batch']} dense {r['dense_requests']}\n{r['context'] // 1024}k" for r in records]
    x = np.arange(len(records))
    for i, (key, name) in enumerate((("full_ms", "full layout + derivation (torch path; GPU before)"),
                                     ("compact_first_layer_ms", "compact, first anchor layer"),
                                     ("compact_later_layers_ms", "compact, later anchor layers"))):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in records], 0.27, label=name)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per anchor layer (host, median)")
    ax.set_title(f"One anchor layer's decode plan on the host, 8 KV heads (measured; {Path(__file__).name})",
                 fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path("decode_plan_layout", a.quick), dpi=120)
    print("records:", path)


if __name__ == "__main__":
    main()
