"""Which page layout holds the most attention at equal tokens (issue 14, goal 4), and how the query heads of
a KV head should share its pages (the GQA merge): IceCache's pages under the spec's layout (each DCI cell's
children cut along one random projection) and under the bisect layout (``index/layout.py``), other ways of
cutting the same cells, cells of other sizes, a layout without the tree, and positional pages.

Every layout is ranked the way the server's exact selection ranks it (per query head, pages by the best
q.k of their tokens; then a GQA merge), on real post-RoPE Q/K, and scored at **equal tokens**: the
attention mass of sink + window + the best pages, read off where the selected pages' tokens reach
``budget - sink - window`` (linear between the page that crosses it and the one before, so a layout of
small pages is neither penalised nor favoured by rounding). ``top_page_recall``: the share of query heads
whose exact best page is among the pages that reach the budget.

Layouts of the tokens between sink and window, per (layer, KV head):

* ``icecache_projection``: the index's pages under ``layout: projection`` (the spec's, the default before).
* ``icecache``: the index's pages under its default layout (``bisect``), level-0 parents searched in the
  whole context (``parent_segment: None``).
* ``icecache_segS``: the same with each level-0 token's parent searched among the level-1 tokens of its own
  run of about S tokens (``parent_segment: S``; the default's cost at long contexts, ``index/config.py``).
* ``cell_principal``: the same cells, each cell's children sorted along its principal direction (power
  iteration on the centred keys) and cut into ``ceil(m / C)`` balanced pages.
* ``cell_bisect``: the same cells, each cut by recursive balanced bisection in NumPy (two-means direction,
  four rounds) until parts hold at most C tokens.
* ``cellsX_<cut>``: cells X times larger on average (the index built with ``p0 / X``), cut as named.
* ``bisect``: no tree, recursive balanced bisection of all the tokens (a balanced two-means tree whose leaves
  are the pages); ``bisect_pos1``: the same over the keys plus their position, scaled to the keys' spread.
* ``positional``: runs of C consecutive tokens.

Merges (``merged_order``): ``rank`` (rank-major, the server's before), ``mass``, ``first_then_mass`` (the
server's ``gqa_merge: mass``), ``first_then_true_mass`` (by exact page mass: an upper bound of ranking).

    python benchmarks/page_layout.py                  # SmolLM2 essays + passkey, Qwen essays; 4k, every layer
    python benchmarks/page_layout.py --quick          # every fourth layer
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, png_path, write_records  # noqa: E402

from icecache_sglang.index import IndexConfig, PagedDCIIndex  # noqa: E402
from icecache_sglang.index.gqa_merge import merge_by_mass  # noqa: E402
from icecache_sglang.index.layout import bisect_order  # noqa: E402

C = 16
MERGES = ("rank", "mass", "first_then_mass", "true_mass", "first_then_true_mass")
#: seconds spent cutting pages per ``iters_p<P>l<L>`` layout (one thread, every cell of every head measured)
CUT_SECONDS: defaultdict = defaultdict(float)
DEFAULT_MERGES = ("rank", "mass", "first_then_mass", "first_then_true_mass")  # how a KV head's query heads share its pages (merged_order)


def sink_window(budget: int) -> tuple[int, int]:
    s = min(32, budget // 4)
    return s, s


# ---------------------------------------------------------------------- cuts


def principal_direction(X: np.ndarray, iters: int = 8) -> np.ndarray:
    Xc = X - X.mean(axis=0)
    v = Xc[np.argmax((Xc * Xc).sum(axis=1))].copy()  # deterministic start: the farthest key
    if not np.any(v):
        return np.eye(X.shape[1])[0]
    for _ in range(iters):
        v = Xc.T @ (Xc @ v)
        nv = np.linalg.norm(v)
        if nv == 0:
            return np.eye(X.shape[1])[0]
        v /= nv
    return v


def two_means_direction(X: np.ndarray, iters: int = 4) -> np.ndarray:
    """The direction between the two centroids of a balanced two-means of X (start: the principal split)."""
    v = principal_direction(X, 4)
    p = X @ v
    half = X.shape[0] // 2
    for _ in range(iters):
        order = np.argsort(p, kind="stable")
        c1, c2 = X[order[:half]].mean(axis=0), X[order[half:]].mean(axis=0)
        v = c2 - c1
        if not np.any(v):
            break
        p = X @ v
    return v


def balanced_runs(order: np.ndarray, m: int) -> list[np.ndarray]:
    npg = -(-m // C)
    out, start = [], 0
    for i in range(npg):
        size = (m - start) // (npg - i)
        out.append(order[start : start + size])
        start += size
    return out


def cut_principal(X: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    if len(ids) <= C:
        return [ids]
    return balanced_runs(ids[np.argsort(X[ids] @ principal_direction(X[ids]), kind="stable")], len(ids))


def cut_bisect(X: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    """Recursive balanced bisection along each part's two-means direction (NumPy; the index's own cut is
    ``layout.bisect_order``, the ``icecache`` and ``iters_*`` layouts)."""
    out, stack = [], [ids]
    while stack:
        part = stack.pop()
        m = len(part)
        if m <= C:
            out.append(part)
            continue
        npg = -(-m // C)
        left = int(round(m * (npg // 2) / npg))
        order = part[np.argsort(X[part] @ two_means_direction(X[part]), kind="stable")]
        stack += [order[:left], order[left:]]
    return out


def cells_of(idx: PagedDCIIndex, n: int) -> list[np.ndarray]:
    """Head 0's cells: the token ids of each parent's children (the root's included)."""
    parent = idx.tok_parent[0, :n]
    order = np.argsort(parent, kind="stable")
    bounds = np.flatnonzero(np.diff(parent[order])) + 1
    return np.split(order, bounds)


def icecache_pages(idx: PagedDCIIndex) -> list[np.ndarray]:
    pages = idx.live_pages(0)
    return [t for t in idx.page_tokens(0, pages)]


def layouts(K: np.ndarray, names: list[str]) -> dict[str, list[np.ndarray]]:
    """Pages (token indices into K) of every named layout for one head's keys ``K [n, d]``."""
    n = K.shape[0]
    out = {}
    built = {}

    def index(scale: int, layout: str | None = None, segment: int | None = None) -> PagedDCIIndex:
        key = (scale, layout, segment)
        if key not in built:
            kw = {"layout": layout} if layout else {}
            cfg = IndexConfig(page_size=C, p0=0.01 / scale, parent_segment=segment, **kw)
            idx = PagedDCIIndex(1, K.shape[1], 0, cfg)
            idx.build(K[None])
            built[key] = idx
        return built[key]

    for name in names:
        if name.startswith("iters_p"):  # the index's bisection (layout.bisect_order) with other iteration counts
            n_power, n_lloyd = (int(x) for x in name[len("iters_p"):].split("l"))
            cells = cells_of(index(1, "projection"), n)
            bisect_order(np.ascontiguousarray(K[cells[0]]), C, n_power, n_lloyd)  # compiled before timing
            t0 = time.perf_counter()
            orders = [cell[bisect_order(np.ascontiguousarray(K[cell]), C, n_power, n_lloyd)] if len(cell) > C
                      else cell for cell in cells]
            CUT_SECONDS[name] += time.perf_counter() - t0
            out[name] = [r for o in orders for r in balanced_runs(o, len(o))]
        elif name.startswith("icecache_seg"):  # the index's pages, level-0 parents searched in runs of S tokens
            out[name] = icecache_pages(index(1, None, int(name[len("icecache_seg"):])))
        elif name == "positional":
            out[name] = [np.arange(i, min(i + C, n)) for i in range(0, n, C)]
        elif name == "bisect":
            out[name] = cut_bisect(K, np.arange(n))
        elif name.startswith("bisect_pos"):  # keys plus position, scaled to alpha x the keys' spread
            alpha = float(name[len("bisect_pos"):])
            Kc = K - K.mean(axis=0)
            spread = np.sqrt((Kc * Kc).sum(axis=1).mean())
            pos = np.arange(n, dtype=np.float64)
            pos = (pos - pos.mean()) / pos.std() * spread * alpha
            out[name] = cut_bisect(np.concatenate([K, pos[:, None]], axis=1), np.arange(n))
        else:
            scale, cut = 1, name
            if name.startswith("cells"):
                head, cut = name.split("_", 1)
                scale = int(head[len("cells"):])
            if cut in ("icecache", "icecache_projection"):  # the index's own pages, default or spec layout
                out[name] = icecache_pages(index(scale, "projection" if cut == "icecache_projection" else None))
                continue
            idx = index(scale, "projection")  # the cells (the same under every layout)
            if cut == "globalpc":  # the cells' children ordered along the head's principal direction
                u = principal_direction(K)
                out[name] = [p for cell in cells_of(idx, n)
                             for p in balanced_runs(cell[np.argsort(K[cell] @ u, kind="stable")], len(cell))]
                continue
            else:
                fn = {"cell_principal": cut_principal, "principal": cut_principal,  # cellsX_principal
                      "cell_bisect": cut_bisect, "bisect": cut_bisect}[cut]
                out[name] = [p for cell in cells_of(idx, n) for p in fn(K, cell)]
    for name, pages in out.items():
        seen = np.concatenate(pages)
        assert seen.size == n and np.unique(seen).size == n, name  # every token in exactly one page
    return out


# ---------------------------------------------------------------------- scoring


def merged_order(page_best: np.ndarray, merge: str, d: int, page_mass: np.ndarray | None = None) -> np.ndarray:
    """Every page of a KV head in the order its group of query heads ``page_best [g, pages]`` picks them.
    ``rank``: rank-major, each head's next best page in turn (``merge_group_pages``, the server's today).
    ``mass``: by the sum over heads of each page's softmax weight among that head's page scores, an
    estimate of the attention mass the page holds for the group. ``first_then_mass``: every head's best page
    first (the decisive pages, heaviest first), then by ``mass``: ``index/gqa_merge.py``'s ``mass`` merge,
    the server's. ``true_mass`` / ``first_then_true_mass``: the same by each
    page's exact attention mass summed over the group (``page_mass [g, pages]``): what reading every key's
    softmax weight would rank, the best any ranking of these pages can do for the mean mass."""
    g, n_pages = page_best.shape
    if merge == "rank":
        ranks = np.argsort(-page_best, axis=1, kind="stable")
        _, first = np.unique(ranks.T.ravel(), return_index=True)
        return ranks.T.ravel()[np.sort(first)]
    if merge == "first_then_mass":  # the server's merge (gqa_merge "mass"), asked for every page in order
        order = merge_by_mass(page_best, g, n_pages, 1.0 / np.sqrt(d))[0]
        return order[order >= 0].astype(np.int64)
    if merge.endswith("true_mass"):
        w = page_mass
    else:
        z = page_best / np.sqrt(d)
        w = np.exp(z - z.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
    order = np.argsort(-w.sum(axis=0), kind="stable")
    if merge in ("mass", "true_mass"):
        return order
    best = list(dict.fromkeys(int(p) for p in page_best.argmax(axis=1)))
    return np.concatenate([best, order[~np.isin(order, best)]]).astype(np.int64)


def mass_at_tokens(q: np.ndarray, K: np.ndarray, probs: np.ndarray, pages: list[np.ndarray], target: int,
                   merges=("rank",)) -> dict:
    """Per merge: (mean over the group's query heads of the mass on the merged best pages read at ``target``
    tokens, share of query heads whose best page is among the pages that reach ``target``).
    ``q [g, d]``, ``K [n, d]`` (the middle keys), ``probs [g, n]`` (those keys' share of the full softmax)."""
    sizes = np.array([len(p) for p in pages])
    flat = np.concatenate(pages)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    s = q @ K.T  # [g, n]
    page_best = np.maximum.reduceat(s[:, flat], starts, axis=1)  # [g, pages]
    page_mass = np.add.reduceat(probs[:, flat], starts, axis=1)  # [g, pages]
    best = page_best.argmax(axis=1)
    out = {}
    for merge in merges:
        order = merged_order(page_best, merge, K.shape[1], page_mass)
        cum_tok = np.cumsum(sizes[order])
        k = int(np.searchsorted(cum_tok, target)) + 1  # pages that reach target tokens
        cum_mass = np.cumsum(page_mass[:, order[:k]], axis=1).mean(axis=0)
        mass = float(np.interp(target, np.concatenate([[0], cum_tok[:k]]), np.concatenate([[0.0], cum_mass])))
        out[merge] = (mass, float(np.isin(best, order[:k]).mean()))
    return out


def run_source(model: str, text: str, n: int, steps: int, layers: list[int] | None, names, budgets,
               merges) -> list[dict]:
    from index_quality import real_layers

    from icecache_sglang.index.metrics import attention_probs

    caps = real_layers(model, text, n, steps)
    CUT_SECONDS.clear()
    layer_ids = layers if layers is not None else list(range(len(caps)))
    rec = defaultdict(list)  # (layout, merge, budget) -> [(layer, mass, top-page share)]
    pages_n = defaultdict(list)
    for li in layer_ids:
        K_all, _V, Q = caps[li]
        H, n_ctx, d = K_all.shape
        g = Q.shape[1] // H
        lay_for = {}
        for b in budgets:
            sink, window = sink_window(b)
            lo, hi = sink, n_ctx - window
            for h in range(H):
                if (sink, h) not in lay_for:
                    lay_for[(sink, h)] = layouts(np.ascontiguousarray(K_all[h, lo:hi]), names)
                    if b == budgets[0]:
                        for nm in names:
                            pages_n[nm].append(len(lay_for[(sink, h)][nm]))
                lay = lay_for[(sink, h)]
                Kh = K_all[h, lo:hi].astype(np.float64)
                for s in range(Q.shape[0]):
                    probs = attention_probs(Q[s, h * g : (h + 1) * g], K_all[h : h + 1])  # [g, n_ctx]
                    fixed = probs[:, :lo].sum(axis=1).mean() + probs[:, hi:].sum(axis=1).mean()
                    qh = Q[s, h * g : (h + 1) * g].astype(np.float64)
                    for nm in names:
                        res = mass_at_tokens(qh, Kh, probs[:, lo:hi], lay[nm], b - sink - window, merges)
                        for merge, (m, top) in res.items():
                            rec[(nm, merge, b)].append((li, fixed + m, top))
    n_ctx = caps[0][0].shape[1]
    out = []
    for (nm, merge, b), rows in rec.items():
        mass = np.array([r[1] for r in rows])
        r = {"source": f"real:{model}", "text": text, "context": n_ctx, "layout": nm, "merge": merge, "budget": b,
             "tokens_attended": b, "mass": float(mass.mean()), "top_page_recall": float(np.mean([r[2] for r in rows])),
             "cases": int(mass.size) * (Q.shape[1] // H), "pages": float(np.mean(pages_n[nm])),
             "mean_page_tokens": float((n_ctx - 2 * sink_window(budgets[0])[0]) / np.mean(pages_n[nm])),
             "layers": layer_ids, **({"cut_seconds": CUT_SECONDS[nm]} if nm in CUT_SECONDS else {})}
        for ref_merge in dict.fromkeys(["rank", merge]):
            if ("positional", ref_merge, b) not in rec:
                continue
            pos = np.array([x[1] for x in rec[("positional", ref_merge, b)]])
            key = "" if ref_merge == merge else f"_{ref_merge}_merge"
            r[f"mass_vs_positional{key}"] = float(mass.mean() / pos.mean())
            if not key:
                r["cases_at_or_above_positional"] = float((mass >= pos - 1e-12).mean())
                per_layer = defaultdict(lambda: [0.0, 0.0])
                for (li, v, _t), pv in zip(rows, pos):
                    per_layer[li][0] += v
                    per_layer[li][1] += pv
                r["layers_at_or_above_positional"] = int(sum(a >= p_ - 1e-12 for a, p_ in per_layer.values()))
                r["layers_measured"] = len(per_layer)
        out.append(r)
    return out


SOURCES = {"smollm2-essays": ("smollm2-135m-instruct", "essays", 4096, 8),
           "smollm2-passkey": ("smollm2-135m-instruct", "passkey", 4096, 8),
           "qwen-essays": ("qwen2.5-coder-0.5b-instruct", "essays", 4096, 24)}
LAYOUTS = ["icecache_projection", "icecache", "cell_principal", "cell_bisect", "cells4_icecache_projection",
           "cells4_icecache", "cells4_bisect", "bisect", "bisect_pos1", "positional"]


def table(records) -> str:
    budgets = sorted({r["budget"] for r in records})
    srcs = sorted({(r["source"], r["text"], r["context"]) for r in records})
    lines = []
    for src in srcs:
        rs = [r for r in records if (r["source"], r["text"], r["context"]) == src]
        lines.append(f"\n**{src[0].split(':')[1]} {src[1]} @ {src[2]}**: mass at equal tokens (vs positional pages "
                     "with the same merge; top-page recall)\n")
        lines.append("| layout | merge | tokens per page | " + " | ".join(str(b) for b in budgets) + " |")
        lines.append("|---|---|---|" + "---|" * len(budgets))
        for nm, merge in dict.fromkeys((r["layout"], r["merge"]) for r in rs):
            cells = []
            for b in budgets:
                r = next(x for x in rs if x["layout"] == nm and x["merge"] == merge and x["budget"] == b)
                cells.append(f"{r['mass']:.3f} ({r.get('mass_vs_positional', 1):.3f}; {r['top_page_recall']:.3f})")
            r0 = next(x for x in rs if x["layout"] == nm)
            lines.append(f"| {nm} | {merge} | {r0['mean_page_tokens']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: the series the figure draws (the JSON holds every layout and merge)
PLOTTED = (("icecache_projection", "rank", "IceCache pages, projection layout, rank merge (before)"),
           ("icecache", "rank", "IceCache pages, bisect layout, rank merge"),
           ("icecache", "first_then_mass", "IceCache pages, bisect layout, mass merge (server default)"),
           ("cells4_icecache", "first_then_mass", "cells 4x larger, bisect layout, mass merge"),
           ("bisect", "first_then_mass", "no tree: bisection of all keys, mass merge"),
           ("positional", "first_then_mass", "positional pages, mass merge"))


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    srcs = sorted({(r["source"], r["text"], r["context"]) for r in records})
    fig, axes = plt.subplots(1, len(srcs), figsize=(5 * len(srcs), 4.8), squeeze=False)
    for ax, src in zip(axes[0], srcs):
        rs = [r for r in records if (r["source"], r["text"], r["context"]) == src]
        for nm, merge, label in PLOTTED:
            rr = sorted((r for r in rs if r["layout"] == nm and r["merge"] == merge), key=lambda r: r["budget"])
            if rr:
                ax.plot([r["budget"] for r in rr], [r.get("mass_vs_positional_rank_merge", r["mass_vs_positional"])
                                                    for r in rr], marker="o", label=label,
                        ls="--" if nm == "positional" else "-")
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="tokens attended (sink + window + pages)", ylabel="attention mass / positional pages' (rank merge)",
               title=f"{src[0].split(':')[1]} {src[1]} @ {src[2]}")
        ax.title.set_fontsize(9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.suptitle(f"page layouts and GQA merges at equal tokens (measured); {machine()}", fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--layouts", nargs="+", default=LAYOUTS)
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--quick", action="store_true", help="every fourth layer")
    ap.add_argument("--context", type=int, help="context length of every source (default: the source's, 4096)")
    ap.add_argument("--name", default="page_layout")
    ap.add_argument("--merges", nargs="+", choices=MERGES, default=list(DEFAULT_MERGES),
                    help="GQA merges (see merged_order)")
    ap.add_argument("--table", type=Path, help="print the tables of a results file and exit")
    ap.add_argument("--replot", type=Path, help="redraw the figure of a results file and exit")
    args = ap.parse_args(argv)
    if args.table or args.replot:
        records = json.loads((args.table or args.replot).read_text())
        if args.replot:
            plot(records, args.replot.with_suffix(".png"))
        else:
            print(table(records))
        return
    names = list(dict.fromkeys(args.layouts + ["positional"]))
    records = []
    t0 = time.time()
    for src in args.sources:
        model, text, n, steps = SOURCES[src]
        n = args.context or n
        from index_quality import real_layers

        n_layers = len(real_layers(model, text, n, steps))
        layers = list(range(0, n_layers, 4)) if args.quick else None
        records += run_source(model, text, n, steps, layers, names, args.budgets, args.merges)
        print(table([r for r in records if r["text"] == text and r["source"].endswith(model)]), flush=True)
    for r in records:
        r["elapsed_s"] = round(time.time() - t0, 1)
    out = write_records(args.name, args.quick, records)
    plot(records, png_path(args.name, args.quick))
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
