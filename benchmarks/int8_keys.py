"""The index's key copy in int8 (issue 14's memory goal): bytes, scan time and exactness against bfloat16.

The index keeps its own copy of the keys in page order (``page_keys``), which the scan and the search read.
In bfloat16 that copy alone is the size of the keys (and the index 1.7x them); in int8 (``keys.py``: the keys
divided by per-channel scales, then a row's ``d`` values over its own float32 scale) it is about half. The int8 copy is approximate, so the exact
selection (the server's default) ranks by it and rescores each query head's best ``2 P`` pages from the key
store (SGLang's pool, which the indexer maps): ``scan.rescore_pages``.

Two parts, both run here in one process:

* **Exactness on real Q/K** (post-RoPE, captured from the model; the store holds the keys in bfloat16 as a
  bfloat16 KV cache would): per (step, layer >= 2, query head), whether the head's exact best page over the
  int8 index's pages (max over a page's tokens of ``q . k``, the exact keys) is selected after the GQA merge
  (``top_page_recall``), whether the selected set equals the exact ranking's (``same_set``), and the
  selection's attention mass relative to the exact ranking's (``mass_vs_exact``, mean and 5th percentile);
  for no rescoring, ``P`` and ``2 P`` (the default); and where the int8 rows alone rank each query head's
  exact best page, with one scale per row and with the channel scales first. Beside it, the layout: the exact ranking's attention
  mass over the int8 index's pages and over a bfloat16 index's (the tree is built over the values each keeps).
* **Bytes and time** (synthetic low-rank keys as ``index_speed.py``: 8 KV heads x 4 query heads each,
  d 128, at 8k-128k; and SmolLM2-135M's 3 x 3 heads, d 64, at 1k, 2k and 8k): the index's allocated bytes per token and layer against the bfloat16 key row, and the median time
  of one step's selection for one layer, interleaved: the bfloat16 copy's scan, the int8 copy's scan with and
  without the rescoring, and a bare read of each copy.

    python benchmarks/int8_keys.py [--quick]
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
from index_quality import real_layers  # noqa: E402

from icecache_sglang.index.config import IndexConfig  # noqa: E402
from icecache_sglang.index.keys import from_storage, kept_keys, round_keys, to_storage  # noqa: E402
from icecache_sglang.index.paged_index import PagedDCIIndex  # noqa: E402
from icecache_sglang.index.scan import read_keys, scan_index, scan_pages  # noqa: E402
from icecache_sglang.index.synthetic import lowrank_keys  # noqa: E402

C = 16
RESCORES = {"int8, no rescoring": 0, "int8, rescore P": 1, "int8, rescore 2P (default)": 2}


def _index(K: np.ndarray, key_dtype: str) -> PagedDCIIndex:
    idx = PagedDCIIndex(K.shape[0], K.shape[2], config=IndexConfig(page_size=C, rebuild_growth=None,
                                                                   key_dtype=key_dtype))
    idx.build(K)
    return idx


def _exact_copy(idx: PagedDCIIndex, K: np.ndarray) -> np.ndarray:
    """The exact keys in ``idx``'s page layout, float32 ``[H, P, C, d]`` (what an exact scan would read)."""
    out = np.zeros(idx.page_tok.shape + (K.shape[2],), np.float32)
    for h in range(idx.H):
        m = idx.page_tok[h] >= 0
        out[h][m] = K[h][idx.page_tok[h][m]]
    return out


def _page_sets(idx, pages) -> list[np.ndarray]:
    return [np.sort(p[p >= 0]) for p in pages]


#: how the int8 rows are scaled, for the rank of each query head's exact best page among its int8 scores
SCALINGS = {"one scale per row": False, "channel scales, then per row (default)": True}


def quality(layers, P: int, source: str) -> list[dict]:
    rows = {m: {"top": 0, "same": 0, "sets": 0, "mass": []} for m in RESCORES}
    layout = {"int8": [], "bfloat16": []}
    ranks = {m: [] for m in SCALINGS}
    cases = 0
    for li, (K, V, Q) in enumerate(layers):
        if li < 2:
            continue
        H, n, d = K.shape
        store = np.ascontiguousarray(to_storage(K.transpose(1, 0, 2), "bfloat16"))  # [n, H, d], the KV cache's keys
        Kb = np.ascontiguousarray(from_storage(store).transpose(1, 0, 2))
        i8, bf = _index(Kb, "int8"), _index(Kb, "bfloat16")
        exact_pk = _exact_copy(i8, Kb)
        approx_pk = {m: _exact_copy(i8, kept_keys(Kb, "int8", i8.key_scale) if scaled
                                    else round_keys(Kb, "int8")) for m, scaled in SCALINGS.items()}
        g = Q.shape[1] // H
        for step in range(Q.shape[0]):
            q = np.ascontiguousarray(Q[step], np.float32)
            logits = np.einsum("hgd,hnd->hgn", q.reshape(H, g, d), Kb) / np.sqrt(d)
            pr = np.exp(logits - logits.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)  # [H, g, n]

            def mass(idx, pages):
                out = np.zeros((H, g))
                for h in range(H):
                    p = pages[h][pages[h] >= 0]
                    toks = idx.page_tok[h, p][np.arange(C)[None, :] < idx.page_fill[h, p][:, None]]
                    out[h] = pr[h][:, toks].sum(-1)
                return out

            ref = scan_pages(exact_pk, i8.page_fill, i8.next_page, q, P, merge="mass")
            ref_sets = _page_sets(i8, ref)
            m_ref = mass(i8, ref)
            # each query head's exact best page over the int8 index's pages
            full = np.einsum("hgd,hpcd->hgpc", q.reshape(H, g, d), exact_pk)
            valid = np.arange(C)[None, None, :] < i8.page_fill[:, :, None]
            full = np.where(valid[:, None], full, -np.inf).max(-1)  # [H, g, pages]
            best = full.argmax(-1)
            for m, pk in approx_pk.items():  # where the int8 rows alone rank each head's exact best page
                approx = np.where(valid[:, None], np.einsum("hgd,hpcd->hgpc", q.reshape(H, g, d), pk), -np.inf).max(-1)
                at_best = np.take_along_axis(approx, best[..., None], -1)
                ranks[m] += list((approx > at_best).sum(-1).ravel())
            for label, f in RESCORES.items():
                got = scan_index(i8, q, P, merge="mass", store=store if f else None, rescore=f * P)
                sets = _page_sets(i8, got)
                r = rows[label]
                r["top"] += sum(int(np.isin(best[h, j], sets[h])) for h in range(H) for j in range(g))
                r["same"] += sum(int(np.array_equal(sets[h], ref_sets[h])) for h in range(H))
                r["sets"] += H
                r["mass"] += list((mass(i8, got) / np.maximum(m_ref, 1e-12)).ravel())
            layout["int8"] += list(m_ref.ravel())
            layout["bfloat16"] += list(mass(bf, scan_pages(bf.page_keys, bf.page_fill, bf.next_page, q, P,
                                                           merge="mass")).ravel())
            cases += H * g
    out = []
    for label, r in rows.items():
        m = np.array(r["mass"])
        out.append({"part": "exactness", "source": source, "pages": P, "method": label,
                    "rescore_pages": RESCORES[label] * P, "top_page_recall": r["top"] / cases,
                    "same_set": r["same"] / r["sets"], "mass_vs_exact": float(m.mean()),
                    "mass_vs_exact_p5": float(np.percentile(m, 5)), "cases": cases})
    for m, r in ranks.items():
        r = np.array(r)
        out.append({"part": "rank_of_best", "source": source, "method": f"int8 rows alone, {m}",
                    "first": float((r == 0).mean()), "within_3": float((r <= 2).mean()), "worst_rank": int(r.max()) + 1,
                    "cases": int(r.size)})
    for kd, ms in layout.items():
        out.append({"part": "layout", "source": source, "pages": P, "method": f"exact ranking, {kd} index",
                    "key_dtype": kd, "attention_mass": float(np.mean(ms)), "cases": cases})
    return out


#: decode steps after the build in the bytes part (one single-token insert each: a 512-token answer)
DECODE_TOKENS = 512


def speed(n: int, reps: int, seed: int = 0, shape: tuple[int, int, int] = (8, 4, 128)) -> list[dict]:
    """``shape``: KV heads, query heads per KV head, head_dim (Llama-3.1-8B's by default)."""
    rng = np.random.default_rng(seed)
    (H, g, d), P = shape, 12
    K, Qs = lowrank_keys(rng, n, d, rank=16, n_queries=reps, heads=H, group=g)
    store = np.ascontiguousarray(to_storage(K.transpose(1, 0, 2), "bfloat16"))
    Kb = np.ascontiguousarray(from_storage(store).transpose(1, 0, 2))
    t0 = time.perf_counter()
    bf = _index(Kb, "bfloat16")
    t_bf = time.perf_counter() - t0
    t0 = time.perf_counter()
    i8 = _index(Kb, "int8")
    t_i8 = time.perf_counter() - t0
    built_bytes = {"bfloat16": bf.nbytes(), "int8": i8.nbytes()}
    built_page_bytes = {"bfloat16": bf.page_keys.nbytes, "int8": i8.page_keys.nbytes}
    ops = {
        "scan, bfloat16 copy": lambda q: scan_pages(bf.page_keys, bf.page_fill, bf.next_page, q, P, merge="mass"),
        "scan, int8 copy + rescore 2P": lambda q: scan_index(i8, q, P, merge="mass", store=store),
        "scan, int8 copy alone": lambda q: scan_index(i8, q, P, merge="mass", rescore=0),
        "read, bfloat16 copy": lambda q: read_keys(bf.page_keys, bf.next_page, bf.page_fill),
        "read, int8 copy": lambda q: read_keys(i8.page_keys, i8.next_page, i8.page_fill),
    }
    times = {k: [] for k in ops}
    for rep in range(reps):
        q = np.ascontiguousarray(Qs[rep], np.float32)
        for k, f in ops.items():
            t = time.perf_counter()
            f(q)
            times[k].append(time.perf_counter() - t)
    key_row = 2 * H * d  # the bfloat16 key row of one token and layer
    out = []
    for k, ts in times.items():
        out.append({"part": "speed", "context": n, "shape": list(shape), "op": k,
                    "median_ms": float(np.median(ts[2:]) * 1e3),
                    "p90_ms": float(np.percentile(ts[2:], 90) * 1e3), "reps": reps - 2})
    # a 512-token answer's decode steps: one insert of one token each (keys near the prompt's, as a model's are)
    new = Kb[:, rng.integers(0, n, DECODE_TOKENS)] + 0.05 * rng.standard_normal((H, DECODE_TOKENS, d)).astype(np.float32)
    after = {}
    for kd, idx in (("bfloat16", bf), ("int8", i8)):
        for i in range(DECODE_TOKENS):
            idx.insert(new[:, i: i + 1])
        after[kd] = idx.nbytes() / (n + DECODE_TOKENS)
    for kd, idx, tb in (("bfloat16", bf, t_bf), ("int8", i8, t_i8)):
        b = built_bytes[kd] / n
        out.append({"part": "bytes", "context": n, "shape": list(shape), "key_dtype": kd, "index_bytes_per_token_layer": b,
                    "key_bytes_per_token_layer": key_row, "index_vs_keys": b / key_row,
                    "page_copy_bytes_per_token_layer": built_page_bytes[kd] / n, "build_s": tb,
                    "decode_tokens": DECODE_TOKENS, "index_vs_keys_after_decode": after[kd] / key_row})
    return out


def plot_bytes(records, path: Path) -> None:
    """Index bytes against the bfloat16 keys, after the build and after a 512-token answer's inserts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for shape, style in (([8, 4, 128], "-"), ([3, 3, 64], "--")):
        by = [r for r in records if r["part"] == "bytes" and r["shape"] == shape]
        for kd, mark in (("bfloat16", "s"), ("int8", "o")):
            rs = [r for r in by if r["key_dtype"] == kd]
            if not rs:
                continue
            ax.plot([r["context"] for r in rs], [r["index_vs_keys"] for r in rs], mark + style,
                    label=f"{kd} copy, {shape[0]}x{shape[2]} heads: built")
            ax.plot([r["context"] for r in rs], [r["index_vs_keys_after_decode"] for r in rs], mark + ":",
                    mfc="none", label=f"... after {rs[0]['decode_tokens']} decode inserts")
    ax.axhline(1.25, color="red", lw=0.8, label="issue 14's bound (1.25x)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens indexed")
    ax.set_ylabel("index bytes / bfloat16 key bytes (allocated)")
    ax.set_title("the index's host bytes per token and layer (measured, allocated)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.text(0.01, 0.01, f"{records[0].get('machine', '')}  |  {records[0].get('command', '')}", fontsize=6)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    sp = [r for r in records if r["part"] == "speed" and r.get("shape", [8, 4, 128]) == [8, 4, 128]]
    for op in dict.fromkeys(r["op"] for r in sp):
        rs = [r for r in sp if r["op"] == op]
        axes[0].plot([r["context"] for r in rs], [r["median_ms"] for r in rs], "o-" if "scan" in op else "x:",
                     label=op)
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("tokens indexed")
    axes[0].set_ylabel("ms per step and layer (median)")
    axes[0].set_title("selection of 12 pages, 8 KV x 32 query heads (measured)", fontsize=9)
    axes[0].legend(fontsize=7)
    by = [r for r in records if r["part"] == "bytes" and r.get("shape", [8, 4, 128]) == [8, 4, 128]]
    for kd in ("bfloat16", "int8"):
        rs = [r for r in by if r["key_dtype"] == kd]
        axes[1].plot([r["context"] for r in rs], [r["index_vs_keys"] for r in rs], "o-", label=f"{kd} page copy")
    axes[1].axhline(1.25, color="red", lw=0.8, label="issue 14's bound (1.25x)")
    axes[1].set_xscale("log", base=2)
    axes[1].set_ylim(0, 2.0)
    axes[1].set_xlabel("tokens indexed")
    axes[1].set_ylabel("index bytes / bfloat16 key bytes (allocated)")
    axes[1].legend(fontsize=7)
    ex = [r for r in records if r["part"] == "exactness"]
    srcs = list(dict.fromkeys(r["source"] for r in ex))
    labels = list(RESCORES)
    w = 0.8 / len(srcs)
    for i, src in enumerate(srcs):
        vals = [next(r["top_page_recall"] for r in ex if r["source"] == src and r["method"] == m) for m in labels]
        axes[2].bar(np.arange(len(labels)) + i * w, vals, w, label=src)
    axes[2].axhline(0.99, color="red", lw=0.8)
    axes[2].set_xticks(np.arange(len(labels)) + 0.4 - w / 2, labels, fontsize=7)
    axes[2].set_ylim(0.8, 1.005)
    axes[2].set_ylabel("top-page recall vs exact keys (real Q/K)")
    axes[2].legend(fontsize=7)
    fig.suptitle("int8 page copy of the keys with exact rescoring from the key store", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.text(0.01, 0.01, f"{records[0].get('machine', '')}  |  {records[0].get('command', '')}", fontsize=7)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one real source, contexts 8k and 32k")
    ap.add_argument("--budget", type=int, default=256, help="tokens: P = (budget - 64) // 16 pages")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON records")
    ap.add_argument("--no-quality", action="store_true", help="bytes and speed only (synthetic keys, no model): "
                    "records in int8_keys_bytes[_quick].json")
    args = ap.parse_args(argv)
    if args.replot:
        path = png_path("int8_keys", args.quick)
        plot(json.loads(path.with_suffix(".json").read_text()), path)
        return
    P = (args.budget - 64) // C
    sources = [("smollm2-135m-instruct", "essays", 4096)]
    if not args.quick:
        sources += [("smollm2-135m-instruct", "passkey", 4096), ("qwen2.5-coder-0.5b-instruct", "essays", 4096)]
    records = []
    small = (1024,) if args.quick else (1024, 2048, 8192)
    runs = [(n, (3, 3, 64)) for n in small] + [(n, (8, 4, 128)) for n in ((8192, 32768) if args.quick
                                                                          else (8192, 32768, 131072))]
    for n, shape in runs:  # SmolLM2-135M's shape, then Llama-3.1-8B's
        recs = speed(n, 12 if n > 40000 else 25, shape=shape)
        records += recs
        for r in recs:
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    for model, text, ctx in ([] if args.no_quality else sources):
        recs = quality(real_layers(model, text, ctx, args.steps), P, f"{model} {text} {ctx}")
        records += recs
        for r in recs:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    name = "int8_keys_bytes" if args.no_quality else "int8_keys"
    path = write_records(name, args.quick, records)
    if not args.no_quality:
        plot(json.loads(path.read_text()), png_path(name, args.quick))
    else:
        plot_bytes(json.loads(path.read_text()), png_path(name, args.quick))


if __name__ == "__main__":
    main()
