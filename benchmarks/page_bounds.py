"""Can a cheap per-page summary decide which of IceCache's semantic pages the exact scoring visits?

Issue 14's search is no faster than a tight scan of every key on CPU (``index_speed.py``) and misses the
exact best page in ~9% of cases at its defaults (``index_quality.py``). This measures the alternative the
issue names: rank IceCache's own pages by a summary score, score exactly only the best ``X`` pages of each
query head, keep the top ``P``. Summaries, per page: the centroid (``centroid``: ``q.c``), the centroid plus
its radius (``ball``: ``q.c + |q| r``, an upper bound), and Quest's box (``box``: ``sum max(q lo, q hi)``,
an upper bound). What it reads, as a share of the keys' bytes: the summaries (centroid: 1/fill of the keys,
box: 2/fill) plus ``X`` pages per query head.

On real post-RoPE Q/K (SmolLM2-135M, 4k tokens, the last 8 positions as decode steps, every layer from the
third), per (step, layer, query head): the exact best page (max over its tokens of q.k) is among the
selected pages (``top_page_recall``, after the GQA merge of a KV head's query heads), and the selected
pages' share of the attention mass relative to oracle pages (``mass_vs_oracle``). Beside it, the index's
own search (``PagedDCIIndex.query``) at ``prop_to_retrieve`` 0.8 (the former default) and 1.0, on the same
pages. Counts and shares are computed from the data (no timing here: see ``index_speed.py``).

    python benchmarks/page_bounds.py [--texts essays passkey] [--context 4096] [--budget 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, write_records  # noqa: E402
from index_quality import real_layers  # noqa: E402

from icecache_sglang.index.config import IndexConfig, QueryParams  # noqa: E402
from icecache_sglang.index.keys import from_storage  # noqa: E402
from icecache_sglang.index.paged_index import PagedDCIIndex  # noqa: E402
from icecache_sglang.index.search import merge_group_pages  # noqa: E402

C = 16
SUMMARIES = ("centroid", "ball", "box")
X_FACTORS = (1, 2, 4, 8)


def page_table(idx: PagedDCIIndex, h: int):
    """Live pages of head h: ids, keys [pages, C, d] (float32), valid mask, token positions."""
    live = idx.live_pages(h)
    keys = from_storage(idx.page_keys[h, live])
    valid = np.arange(idx.C)[None, :] < idx.page_fill[h, live][:, None]
    pos = np.where(valid, idx.positions[np.maximum(idx.page_tok[h, live], 0)], -1)
    return live, keys, valid, pos


def summaries(keys: np.ndarray, valid: np.ndarray) -> dict:
    w = valid[..., None].astype(np.float32)
    cnt = np.maximum(valid.sum(1), 1)[:, None]
    c = (keys * w).sum(1) / cnt
    r = np.sqrt((((keys - c[:, None]) ** 2).sum(-1) * valid).max(1))
    lo = np.where(valid[..., None], keys, np.inf).min(1)
    hi = np.where(valid[..., None], keys, -np.inf).max(1)
    return {"c": c, "r": r, "lo": lo, "hi": hi}


def summary_scores(kind: str, s: dict, q: np.ndarray) -> np.ndarray:
    """[g, pages] summary score of each page for each query row."""
    if kind == "centroid":
        return q @ s["c"].T
    if kind == "ball":
        return q @ s["c"].T + np.linalg.norm(q, axis=1)[:, None] * s["r"][None]
    return np.maximum(q[:, None, :] * s["lo"][None], q[:, None, :] * s["hi"][None]).sum(-1)


def top_rows(score: np.ndarray, pages: np.ndarray, n: int) -> np.ndarray:
    """Per row, the ``n`` best page ids (score descending, lower page id on ties), -1 padded."""
    order = np.lexsort((np.broadcast_to(pages, score.shape), -score), axis=1)[:, :n]
    out = pages[order].astype(np.int32)
    if out.shape[1] < n:
        out = np.concatenate([out, np.full((out.shape[0], n - out.shape[1]), -1, np.int32)], axis=1)
    return out


def evaluate(layers, P: int, params_list) -> list[dict]:
    rows = []
    for li, (K, V, Q) in enumerate(layers):
        if li < 2:
            continue
        H, n, d = K.shape
        idx = PagedDCIIndex(H, d, config=IndexConfig(page_size=C, rebuild_growth=None))
        idx.build(K)
        g = Q.shape[1] // H
        tabs = [page_table(idx, h) for h in range(H)]
        sums = [summaries(t[1], t[2]) for t in tabs]
        key_bytes = sum(int(t[2].sum()) for t in tabs) * d * 2
        for step in range(Q.shape[0]):
            q = Q[step].astype(np.float32)
            for h in range(H):
                live, keys, valid, pos = tabs[h]
                qh = q[h * g:(h + 1) * g]
                exact = np.where(valid[None], np.einsum("gd,pcd->gpc", qh, keys), -np.inf).max(2)  # [g, pages]
                best = live[np.argmax(exact, axis=1)]
                logits = qh @ K[h].T / np.sqrt(d)
                pr = np.exp(logits - logits.max(1, keepdims=True))
                pr /= pr.sum(1, keepdims=True)  # [g, n] attention over the indexed tokens
                tok_mass = lambda pages: np.array([pr[r, pos[np.isin(live, pages)][valid[np.isin(live, pages)]]].sum()
                                                   for r in range(g)])  # noqa: E731
                oracle = merge_group_pages(top_rows(exact, live, P), g, P)[0]
                m_oracle = tok_mass(oracle[oracle >= 0])
                methods = {}
                for kind in SUMMARIES:
                    ss = summary_scores(kind, sums[h], qh)
                    for xf in X_FACTORS:
                        X = min(xf * P, live.size)
                        cand = top_rows(ss, live, X)  # [g, X]
                        resc = np.full((g, X), -np.inf, np.float32)
                        for r in range(g):
                            sel = np.searchsorted(live, cand[r])
                            resc[r] = exact[r, sel]
                        rows_r = np.stack([cand[r][np.lexsort((cand[r], -resc[r]))][:P] for r in range(g)])
                        summary_bytes = {"centroid": 1, "ball": 1, "box": 2}[kind] * live.size * d * 2
                        methods[f"{kind}/X={xf}P"] = (merge_group_pages(rows_r, g, P)[0],
                                                      (summary_bytes + len(np.unique(cand)) * C * d * 2))
                for label, prm in params_list:
                    got = idx.query_rows(qh, np.full(g, h, np.int32), P, prm)[0]
                    methods[label] = (merge_group_pages(got, g, P)[0], None)
                for label, (pages, nbytes) in methods.items():
                    chosen = pages[pages >= 0]
                    rows.append({"layer": li, "step": step, "head": h, "method": label,
                                 "top_page_hits": int(np.isin(best, chosen).sum()), "cases": g,
                                 "mass_vs_oracle": float(np.mean(tok_mass(chosen) / np.maximum(m_oracle, 1e-12))),
                                 "read_share": None if nbytes is None else nbytes / (key_bytes / H)})
    return rows


def summarize(rows: list[dict], source: str, context: int, P: int) -> list[dict]:
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        masses = np.array([r["mass_vs_oracle"] for r in rs])
        shares = [r["read_share"] for r in rs if r["read_share"] is not None]
        out.append({"source": source, "context": context, "pages": P, "method": m,
                    "top_page_recall": sum(r["top_page_hits"] for r in rs) / sum(r["cases"] for r in rs),
                    "mass_vs_oracle_mean": float(masses.mean()), "mass_vs_oracle_p5": float(np.percentile(masses, 5)),
                    "read_share_of_keys": float(np.mean(shares)) if shares else None,
                    "cases": sum(r["cases"] for r in rs)})
    return out


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    srcs = list(dict.fromkeys(r["source"] for r in records))
    fig, axes = plt.subplots(1, len(srcs), figsize=(6 * len(srcs), 4.2), squeeze=False)
    for ax, src in zip(axes[0], srcs):
        rs = [r for r in records if r["source"] == src]
        for kind, mk in zip(SUMMARIES, "osd"):
            pts = [(r["read_share_of_keys"], r["top_page_recall"]) for r in rs if r["method"].startswith(kind + "/")]
            ax.plot(*zip(*pts), mk + "-", label=f"{kind} summary, X = 1..8 P")
        for r in rs:
            if r["read_share_of_keys"] is None:
                ax.axhline(r["top_page_recall"], ls=":", color="gray")
                ax.text(0.01, r["top_page_recall"], r["method"], fontsize=7, va="bottom")
        ax.axhline(0.99, color="red", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("bytes read / key bytes (summaries + rescored pages)")
        ax.set_ylabel("top-page recall (after the GQA merge)")
        ax.set_title(src, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("page summaries over IceCache's pages: which pages to score exactly (computed from captured Q/K)",
                 fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.88, wspace=0.25)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--texts", nargs="+", default=["essays", "passkey"])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget", type=int, default=256, help="tokens: P = (budget - 64) // 16 pages")
    args = ap.parse_args(argv)
    P = (args.budget - 64) // C
    params_list = [("search prop=0.8", QueryParams(prop_to_retrieve=0.8)),
                   ("search prop=1.0", QueryParams(prop_to_retrieve=1.0)),
                   ("search prop=1.0 fov=120", QueryParams(prop_to_retrieve=1.0, fov=120))]
    records = []
    for text in args.texts:
        layers = real_layers(args.model, text, args.context, args.steps)
        rows = evaluate(layers, P, params_list)
        recs = summarize(rows, f"{args.model} {text}", args.context, P)
        records += recs
        for r in recs:
            share = "" if r["read_share_of_keys"] is None else f"  reads {r['read_share_of_keys']:.3f} of key bytes"
            print(f"{text:8s} {r['method']:22s} top-page {r['top_page_recall']:.4f}  mass {r['mass_vs_oracle_mean']:.4f}"
                  f" (p5 {r['mass_vs_oracle_p5']:.3f}){share}", flush=True)
    write_records("page_bounds", False, records)
    plot(records, png_path("page_bounds", False))


if __name__ == "__main__":
    main()
