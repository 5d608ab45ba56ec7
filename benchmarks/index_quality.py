"""Index quality: attention-mass recall, recall@k, attention-output error, tokens attended and whether each
query head's best page is found, vs budget, for IceCache pages and every baseline, on synthetic keys and on
real Q/K captured from a real model; plus a sweep of the search parameters (quality vs query time).

Every page method runs as IceCache does: the first ``sink`` and last ``window`` tokens are always kept
(``min(32, budget/4)`` each) and the rest of the budget is spent on pages of the tokens between them.
StreamingLLM spends the whole budget on 4 sink tokens + the recent window; the token oracle picks the
budget's best tokens anywhere (an upper bound). The last ``steps`` positions of the prompt act as decode
queries over the context before them.

Two ways to give methods "the same budget" (``budget_basis`` in every record):

* ``pages``: every page method gets the same number of pages, ``(budget - sink - window) // page_size`` per
  KV head; the token oracle and StreamingLLM get ``budget`` tokens. IceCache's pages are not all full
  (positional pages are), so at equal pages IceCache attends fewer tokens: see ``tokens_attended``.
* ``icecache_tokens``: per (step, layer, KV head), oracle_positional and Quest get as many pages as make
  IceCache's page tokens there (``round(tokens / page_size)``, at least 1, plus the same sink and window),
  and the token oracle and StreamingLLM get IceCache's total token count: methods compared at equal tokens.

Metrics (means over layers, query heads and steps unless named otherwise):

* ``mass_recall``: attention mass on the selected tokens; ``mass_rel_oracle_page``: mean over (step, layer)
  of the ratio to oracle pages' mass (pages basis, same budget); ``mass_recall_p5``: 5th percentile of that
  ratio over (step, layer); ``mass_recall_p5_cases``: the same over (step, layer, query head).
* ``tokens_attended``: distinct positions a KV head's selection covers, sink and window included.
* ``top_page_recall`` (IceCache, oracle pages): share of (step, layer, query head) cases whose exact best
  page (among IceCache's own pages: max over the page's tokens of q.k for that query head) is in the final
  page set of the head's KV head, i.e. after the GQA merge; ``top_page_recall_own_row``: in the query head's
  own ranked list before the merge (``PagedDCIIndex.query_rows``).
* ``top_token_recall`` (every method): the same question by token: is the query head's highest-q.k token
  between sink and window selected (for whole pages of IceCache's layout this equals top_page_recall);
  ``top_miss_logit_gap_median``: over the missed cases, the median logit the selection gives up at the top
  (log of best token's probability / best selected token's).
* ``query_ms``: median over (step, layer) of the wall time of one ``PagedDCIIndex.query`` (one layer, all
  KV heads, one step; the best of 3 identical calls), ``query_ms_mean`` its mean; ``query_ms_per_step``:
  the median over steps of the sum over layers. The search runs on ``--search-threads`` numba threads
  (default 1, see there). The search parameters (``fov`` as used,
  ``prop_to_retrieve``, ``num_to_retrieve``) are in every record.

    python benchmarks/index_quality.py --quick     # about 3 min once the model is cached
    python benchmarks/index_quality.py             # full sweep (4k-16k, budgets 64-2048)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, write_records  # noqa: E402

from icecache_sglang.index.config import DEFAULT_GQA_MERGE, GQA_MERGES, MAX_FOV, QueryParams  # noqa: E402
from icecache_sglang.index.metrics import (attention_probs, best_pages, dense_output,  # noqa: E402
                                           mass_recall_per_head, output_rel_err, pages_covering, ratio_percentile,
                                           recall_at_k, row_top_page_hits, tokens_per_head, top_logit_gap,
                                           top_page_hits, top_token_hits)
from icecache_sglang.index.selection import POLICIES, SinkWindowPolicy, default_sink_window  # noqa: E402
from icecache_sglang.index.synthetic import clustered_keys, lowrank_keys  # noqa: E402

METHODS = ["icecache", "oracle_token", "oracle_page", "oracle_positional", "quest", "streaming"]
ICE_LAYOUT = ("icecache", "oracle_page")  # methods that select IceCache's own pages
TOKEN_MATCHED = ("oracle_positional", "quest", "oracle_token", "streaming")  # re-run at IceCache's tokens
BASES = ("pages", "icecache_tokens")
RECALL_K = 64
TIME_REPEATS = 3  # query time: the best of this many identical calls (2 cores shared with other work)
GOALS = {"top_page_recall": 0.99, "mass_recall_p5": 0.9}
#: search settings of the quality-vs-query-time curve (the default first; each varies one parameter, then two
#: combined, then exhaustive: every child scored, frontier unbounded, which must equal oracle pages)
SWEEP = ([QueryParams()] + [QueryParams(fov=f) for f in (8, 16, 60, 120, 480)]
         + [QueryParams(prop_to_retrieve=p) for p in (0.4, 0.6, 0.9, 1.0)] + [QueryParams(num_to_retrieve=32)]
         + [QueryParams(fov=120, prop_to_retrieve=1.0), QueryParams(fov=MAX_FOV, prop_to_retrieve=1.0)])


SINK_WINDOW: tuple[int, int] | None = None  # --sink/--window override of default_sink_window
GQA_MERGE = DEFAULT_GQA_MERGE  # --gqa-merge: how every page method shares a KV head's pages (index/gqa_merge.py)


def sink_window(budget: int) -> tuple[int, int]:
    return SINK_WINDOW if SINK_WINDOW is not None else default_sink_window(budget)


def make_policy(method: str, budget: int, page_size: int, shared_index=None):
    if method == "oracle_page":
        pol = POLICIES[method](page_size=page_size, index=shared_index)
    else:
        pol = POLICIES[method](page_size=page_size)
    if method in ("streaming", "oracle_token"):
        return pol
    return SinkWindowPolicy(pol, *sink_window(budget)).set_merge(GQA_MERGE)


def params_fields(params: QueryParams, n_indexed: int) -> dict:
    return {"fov": params.fov_for(n_indexed), "fov_setting": "auto" if params.fov is None else params.fov,
            "prop_to_retrieve": params.prop_to_retrieve, "num_to_retrieve": params.num_to_retrieve}


def params_label(params: QueryParams) -> str:
    if params.fov == MAX_FOV and params.prop_to_retrieve == 1.0:
        return "exhaustive"
    d = QueryParams()
    parts = [f"{k}={getattr(params, k)}" for k in ("fov", "prop_to_retrieve", "num_to_retrieve")
             if getattr(params, k) != getattr(d, k)]
    return ", ".join(parts) or "default"


class PageTable:
    """IceCache's pages of one layer (public API only), in positions of the keys the index was built on."""

    def __init__(self, index, n: int):
        H = index.H
        self.ids = [index.live_pages(h) for h in range(H)]
        padded = np.full((H, max(1, max(len(p) for p in self.ids))), -1, np.int64)
        for h, p in enumerate(self.ids):
            padded[h, : len(p)] = p
        pos = index.page_positions(padded)  # [H, L, C], -1 padded
        self.pos = [pos[h, : len(p)] for h, p in enumerate(self.ids)]
        self.page_of = np.full((H, n), -1, np.int64)
        for h in range(H):
            valid = pos[h] >= 0
            self.page_of[h, pos[h][valid]] = np.broadcast_to(padded[h][:, None], pos[h].shape)[valid]
        self.mean_fill = float(np.mean([(p >= 0).sum(axis=1).mean() for p in self.pos]))


class QueryTimer:
    """Times every ``index.query`` call (the search and the GQA merge) without changing what it returns."""

    def __init__(self, index, warm_queries):
        self.calls: list[float] = []
        query = index.query
        query(warm_queries, 1)  # load the search's compiled code before anything is timed

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = query(*args, **kwargs)
            self.calls.append(time.perf_counter() - t)
            return out

        index.query = timed

    def lap(self) -> list[float]:
        calls, self.calls = self.calls, []
        return calls


def step_metrics(sel, probs, dense, values, cand) -> dict:
    return {"mass": mass_recall_per_head(probs, sel), "recall": recall_at_k(probs, sel, RECALL_K),
            "err": output_rel_err(probs, values, sel, dense), "tokens": tokens_per_head(sel),
            "top_token": top_token_hits(probs, sel, cand), "gap": top_logit_gap(probs, sel, cand)}


def evaluate_layer_steps(keys, values, queries, budgets, page_size, methods=METHODS, params: QueryParams | None = None,
                         equal_tokens: bool = True, sweep=(), sweep_budget: int | None = None):
    """One layer, per step: ``({(method, budget, basis): {metric: [steps, ...]}}, {(setting, budget): {...}})``.

    Each policy is built once per sink/window setting; oracle pages reuse IceCache's index (the same layout
    by construction). ``sweep``: QueryParams settings run for IceCache at ``sweep_budget`` (pages basis)."""
    params = params or QueryParams()
    H, n, _ = keys.shape
    g = queries.shape[1] // H
    C = page_size
    probs = [attention_probs(q, keys) for q in queries]
    dense = [dense_output(p, values) for p in probs]
    groups: dict[tuple, list[int]] = {}
    for b in budgets:
        groups.setdefault(sink_window(b), []).append(b)
    out, sweep_out = {}, {}
    for group in groups.values():
        shared = None
        pols = {}
        for method in (["icecache"] if "icecache" in methods else []) + [m for m in methods if m != "icecache"]:
            pols[method] = make_policy(method, group[0], C, shared)
            pols[method].build(keys)
            if method == "icecache":
                pols[method].inner.params = params
                shared = pols[method].inner.index
        ice = pols.get("icecache")
        lo, hi = (ice.lo, ice.hi) if ice is not None else (0, n)
        has_pages = ice is not None and ice.has_middle
        fixed = lo + (n - hi)
        cand = np.arange(lo, hi) if hi > lo else None
        if has_pages:
            idx = ice.inner.index
            table = PageTable(idx, hi - lo)
            kmid = np.ascontiguousarray(keys[:, lo:hi])
            best = [best_pages(q, kmid, table.ids, table.pos)[0] for q in queries]
            timer = QueryTimer(idx, queries[0])
            row_head = np.repeat(np.arange(H), g)
        head_pols = {}
        if equal_tokens and has_pages:
            for m in TOKEN_MATCHED:
                if m in methods:
                    head_pols[m] = [make_policy(m, group[0], C) for _ in range(H)]
                    for h, p in enumerate(head_pols[m]):
                        p.build(np.ascontiguousarray(keys[h : h + 1]))

        def run_page_method(m, budget, pol):
            res = defaultdict(list)
            for s, q in enumerate(queries):
                if m == "icecache":
                    timer.lap()
                sel = pol.select(q, budget)
                for k, v in step_metrics(sel, probs[s], dense[s], values, cand).items():
                    res[k].append(v)
                if has_pages and m in ICE_LAYOUT:
                    pages = pages_covering([x[(x >= lo) & (x < hi)] - lo for x in sel], table.page_of)
                    res["top_page"].append(top_page_hits(best[s], pages))
                    res["pages"].append([len(p) for p in pages])
                if has_pages and m == "icecache":
                    n_pages = max(1, (budget - fixed) // C)
                    for _ in range(TIME_REPEATS - 1):  # the same query again: best of TIME_REPEATS calls
                        idx.query(q, n_pages, pol.inner.params, merge=GQA_MERGE)
                    res["query_s"].append(min(timer.lap()))
                    rows, _ = idx.query_rows(q, row_head, n_pages, pol.inner.params)
                    res["top_page_own_row"].append(row_top_page_hits(best[s], rows))
            return {k: np.asarray(v) for k, v in res.items()}

        for budget in group:
            for m in methods:
                out[(m, budget, "pages")] = run_page_method(m, budget, pols[m])
            if has_pages and sweep and budget == sweep_budget:
                for i, sp in enumerate(sweep):
                    ice.inner.params = sp
                    sweep_out[(i, budget)] = run_page_method("icecache", budget, ice)
                ice.inner.params = params
            if not head_pols or "icecache" not in methods:
                continue
            ice_tok = out[("icecache", budget, "pages")]["tokens"]  # [steps, H]
            for m, hp in head_pols.items():
                res = defaultdict(list)
                for s, q in enumerate(queries):
                    sel = []
                    for h in range(H):
                        t = int(ice_tok[s, h])
                        if m in ("oracle_token", "streaming"):
                            b = t
                        else:
                            b = fixed + max(1, int(round((t - fixed) / C))) * C
                        sel.append(hp[h].select(q[h * g : (h + 1) * g], b)[0])
                    for k, v in step_metrics(sel, probs[s], dense[s], values, cand).items():
                        res[k].append(v)
                out[(m, budget, "icecache_tokens")] = {k: np.asarray(v) for k, v in res.items()}
    return out, sweep_out


def evaluate_layer(keys, values, queries, budgets, page_size, methods=METHODS):
    """``{(method, budget): (mass, recall, err)}`` for one layer (pages basis; means over steps and heads)."""
    out, _ = evaluate_layer_steps(keys, values, queries, budgets, page_size, methods, equal_tokens=False)
    return {(m, b): (float(r["mass"].mean()), float(r["recall"].mean()), float(r["err"].mean()))
            for (m, b, _basis), r in out.items()}


def summarize(res: dict, oracle: dict | None, n_layers: int) -> dict:
    """Record fields from stacked per-step arrays ``[layers, steps, ...]`` of one (method, budget, basis);
    ``oracle``: oracle pages' arrays at the same budget (pages basis)."""
    mass = res["mass"]  # [L, S, Hq]
    f = {"mass_recall": float(mass.mean()), "recall_at_k": float(res["recall"].mean()),
         "output_rel_err": float(res["err"].mean()), "tokens_attended": float(res["tokens"].mean()),
         "mass_recall_p5_abs": float(np.percentile(mass.mean(axis=-1), 5)),
         "top_token_recall": float(res["top_token"].mean())}
    if oracle is not None:
        om = oracle["mass"]
        ratio = mass.mean(axis=-1) / np.where(om.mean(axis=-1) > 0, om.mean(axis=-1), np.nan)
        f["mass_rel_oracle_page"] = float(np.nanmean(ratio))
        f["mass_recall_p5"] = ratio_percentile(mass.mean(axis=-1), om.mean(axis=-1), 5)
        f["mass_recall_p5_cases"] = ratio_percentile(mass, om, 5)
    gap = res["gap"]
    miss = (gap > 0) & np.isfinite(gap)
    f["top_cases"] = int(gap.size)
    f["top_token_misses"] = int((gap > 0).sum())
    f["top_miss_logit_gap_median"] = float(np.median(gap[miss])) if miss.any() else 0.0
    f["top_miss_near_ties"] = int((miss & (gap < 0.1)).sum())  # misses within 0.1 logit: near ties
    if "top_page" in res:
        f["top_page_recall"] = float(res["top_page"].mean())
        f["pages_selected"] = float(res["pages"].mean())
    if "top_page_own_row" in res:
        f["top_page_recall_own_row"] = float(res["top_page_own_row"].mean())
    if "query_s" in res:
        f["query_ms"] = float(np.median(res["query_s"]) * 1e3)  # median over (layer, step)
        f["query_ms_mean"] = float(res["query_s"].mean() * 1e3)
        f["query_ms_per_step"] = float(np.median(res["query_s"].sum(axis=0)) * 1e3)  # all layers of one step
    return f


def synthetic_layers(kind: str, n: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    gen = clustered_keys if kind == "clustered" else lowrank_keys
    K, Q = gen(rng, n, 64, n_queries=steps, heads=2, group=4)
    V = rng.standard_normal(K.shape).astype(np.float32)
    return [(K, V, Q)]


def real_layers(model: str, text: str, n: int, steps: int):
    from transformers import AutoTokenizer

    from icecache_sglang.models.capture import capture_qkv
    from icecache_sglang.models.fetch import ensure_model
    from icecache_sglang.models.texts import essay_prompt, passkey_prompt

    tok = AutoTokenizer.from_pretrained(ensure_model(model))
    ids = essay_prompt(tok, n + steps) if text == "essays" else passkey_prompt(tok, n + steps, depth=0.5)[0]
    return [(layer.keys, layer.values, layer.queries) for layer in capture_qkv(model, ids, steps)]


def _panel(r) -> tuple:
    return (r["source"], r["text"], r["context"])


def _panel_title(src, text, ctx) -> str:
    return f"{src}{' ' + text if text else ''}, {ctx / 1024:.0f}k"


def plot(records, path: Path, budget_mark=256):
    """Mass recall against the tokens each selection actually attends: solid, every page method at the same
    page count; dashed (hollow markers), the positional methods at IceCache's token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = [r for r in records if r["layer"] == "mean"]
    panels = sorted({_panel(r) for r in mean})
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for ax, panel in zip(axes.flat, panels):
        for method in METHODS:
            for basis in BASES:
                pts = sorted((r.get("tokens_attended", r["budget"]), r["mass_recall"]) for r in mean
                             if _panel(r) == panel and r["method"] == method
                             and r.get("budget_basis", "pages") == basis)
                if not pts:
                    continue
                ax.plot(*zip(*pts), marker="o", color=colors[method], ls="-" if basis == "pages" else "--",
                        mfc=None if basis == "pages" else "none", lw=2.2 if method == "icecache" else 1.2,
                        label=method if basis == "pages" else f"{method} @ IceCache tokens")
        ax.axvline(budget_mark, color="grey", lw=0.5, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(_panel_title(*panel), fontsize=9)
        ax.set_xlabel("tokens attended per KV head")
        ax.set_ylim(0, 1.01)
    for row in axes:
        row[0].set_ylabel("attention-mass recall")
    axes.flat[0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _family(r) -> str:
    d = QueryParams()
    changed = [k for k in ("fov_setting", "prop_to_retrieve", "num_to_retrieve")
               if r[k] != {"fov_setting": "auto", "prop_to_retrieve": d.prop_to_retrieve,
                           "num_to_retrieve": d.num_to_retrieve}[k]]
    return changed[0] if len(changed) == 1 else ("default" if not changed else "combined")


def _short(r) -> str:
    if r["setting"] in ("default", "exhaustive"):
        return r["setting"]
    return r["setting"].replace("prop_to_retrieve=", "p").replace("num_to_retrieve=", "ntr").replace("fov=", "f") \
        .replace(", ", "+")


def plot_sweep(sweep, path: Path):
    """Quality against query time for each search setting, one column per source: IceCache's mass relative
    to oracle pages (mean filled, 5th percentile over (step, layer) hollow) and top-page recall. Settings that
    vary one parameter are joined in parameter order; dotted lines are the goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({_panel(r) for r in sweep})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 7.0), squeeze=False)
    style = {"fov_setting": ("C0", "o"), "prop_to_retrieve": ("C1", "s"), "num_to_retrieve": ("C2", "^"),
             "combined": ("C3", "D"), "default": ("k", "*")}  # default last: drawn on top
    names = {"fov_setting": "fov", "prop_to_retrieve": "prop_to_retrieve", "num_to_retrieve": "num_to_retrieve",
             "default": "default", "combined": "fov + prop / exhaustive"}
    for col, panel in enumerate(panels):
        rs = [r for r in sweep if _panel(r) == panel]
        for fam, (c, mk) in style.items():
            fr = [r for r in rs if _family(r) == fam]
            if fam in ("fov_setting", "prop_to_retrieve"):
                default = [r for r in rs if _family(r) == "default"]
                key = "fov" if fam == "fov_setting" else "prop_to_retrieve"
                fr = sorted(fr + default, key=lambda r: r[key])
            if not fr:
                continue
            ls = "-" if fam in ("fov_setting", "prop_to_retrieve") else "none"
            ms = 11 if fam == "default" else 6
            x = [r["query_ms"] for r in fr]
            axes[0, col].plot(x, [r["mass_rel_oracle_page"] for r in fr], marker=mk, ms=ms, color=c, ls=ls,
                              label=names[fam])
            axes[0, col].plot(x, [r["mass_recall_p5"] for r in fr], marker=mk, ms=ms, color=c,
                              ls=":" if ls == "-" else "none", mfc="none")
            axes[1, col].plot(x, [r["top_page_recall"] for r in fr], marker=mk, ms=ms, color=c, ls=ls,
                              label=names[fam])
        for r in rs:
            for row, y in ((0, r["mass_rel_oracle_page"]), (1, r["top_page_recall"])):
                axes[row, col].annotate(_short(r), (r["query_ms"], y), fontsize=6, xytext=(3, -8),
                                        textcoords="offset points")
        axes[0, col].axhline(GOALS["mass_recall_p5"], color="grey", lw=0.6, ls=":")
        axes[1, col].axhline(GOALS["top_page_recall"], color="grey", lw=0.6, ls=":")
        axes[0, col].set_title(f"{_panel_title(*panel)}, budget {rs[0]['budget']}", fontsize=9)
        for row in range(2):
            axes[row, col].set_xlabel("ms per index.query (median; one layer, all KV heads)")
    axes[0, 0].set_ylabel("mass / oracle pages' (hollow: p5 over (step, layer))")
    axes[1, 0].set_ylabel("top-page recall (after the GQA merge)")
    axes[1, 0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x, fmt=".3f") -> str:
    return "—" if x is None else format(x, fmt)


def target_table(records, budget=256) -> str:
    """At one budget: how far the search is from exact scoring over the same pages (means hide the tail:
    p5, top-page recall), and every method at equal pages and at equal tokens."""
    mean = [r for r in records if r["layer"] == "mean" and r["budget"] == budget]
    panels = sorted({_panel(r) for r in mean})

    def get(panel, method, basis="pages"):
        return next((r for r in mean if _panel(r) == panel and r["method"] == method
                     and r.get("budget_basis", "pages") == basis), {})

    out = ["| source | context | icecache | oracle_page | icecache / oracle_page (mean of ratios) "
           "| p5 over (step, layer) | p5 over cases | top_page_recall | before GQA merge | misses: median logit gap | query ms/step |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for panel in panels:
        ice, orc = get(panel, "icecache"), get(panel, "oracle_page")
        if not ice or not orc:
            continue
        rel = ice.get("mass_rel_oracle_page", ice["mass_recall"] / orc["mass_recall"])
        out.append(f"| {panel[0]}{' ' + panel[1] if panel[1] else ''} | {panel[2]} | {ice['mass_recall']:.3f} | "
                   f"{orc['mass_recall']:.3f} | {rel:.3f} | {_f(ice.get('mass_recall_p5'))} | "
                   f"{_f(ice.get('mass_recall_p5_cases'))} | {_f(ice.get('top_page_recall'), '.4f')} | "
                   f"{_f(ice.get('top_page_recall_own_row'), '.4f')} | "
                   f"{_f(ice.get('top_miss_logit_gap_median'), '.2f')} | "
                   f"{_f(ice.get('query_ms_per_step'), '.1f')} |")
    out += ["", f"Mass recall (tokens attended per KV head) at a {budget}-token budget, at equal pages and at "
            "IceCache's tokens:", "",
            "| source | context | icecache | oracle_page | oracle_positional | oracle_positional @ IceCache tokens "
            "| quest | quest @ IceCache tokens | streaming | streaming @ IceCache tokens |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for panel in panels:
        cells = []
        for m, basis in (("icecache", "pages"), ("oracle_page", "pages"), ("oracle_positional", "pages"),
                         ("oracle_positional", "icecache_tokens"), ("quest", "pages"), ("quest", "icecache_tokens"),
                         ("streaming", "pages"), ("streaming", "icecache_tokens")):
            r = get(panel, m, basis)
            cells.append(f"{r['mass_recall']:.3f} ({r['tokens_attended']:.0f})" if "tokens_attended" in r
                         else _f(r.get("mass_recall")))
        out.append(f"| {panel[0]}{' ' + panel[1] if panel[1] else ''} | {panel[2]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def sweep_table(sweep) -> str:
    out = []
    for panel in sorted({_panel(r) for r in sweep}):
        rs = [r for r in sweep if _panel(r) == panel]
        out += [f"**{_panel_title(*panel)}**, budget {rs[0]['budget']}:", "",
                "| setting | fov | prop_to_retrieve | num_to_retrieve | mass / oracle_page | p5 | top_page_recall "
                "| tokens | query ms | ms/step |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            out.append(f"| {r['setting']} | {r['fov']} | {r['prop_to_retrieve']} | {r['num_to_retrieve']} | "
                       f"{r['mass_rel_oracle_page']:.3f} | {r['mass_recall_p5']:.3f} | {r['top_page_recall']:.4f} | "
                       f"{r['tokens_attended']:.0f} | {r['query_ms']:.2f} | {r['query_ms_per_step']:.1f} |")
        out.append("")
    return "\n".join(out)


def markdown_tables(records, budgets_shown=(64, 256, 1024), sweep=None) -> str:
    """Markdown tables of a results file: the 256-token summary, per-budget tables, and the sweep."""
    mean = [r for r in records if r["layer"] == "mean"]
    out = ["At a 256-token budget (pages basis unless named):\n", target_table(records), ""]
    for panel in sorted({_panel(r) for r in mean}):
        rows = [r for r in mean if _panel(r) == panel and r.get("budget_basis", "pages") == "pages"]
        shown = [b for b in budgets_shown if any(r["budget"] == b for r in rows)]
        out.append(f"**{_panel_title(*panel)}**: mass recall (recall@{RECALL_K}, output error, tokens attended) "
                   "by budget\n")
        out.append("| method | " + " | ".join(str(b) for b in shown) + " |")
        out.append("|---|" + "---|" * len(shown))
        for m in METHODS:
            cells = []
            for b in shown:
                r = next((x for x in rows if x["method"] == m and x["budget"] == b), None)
                cells.append("—" if r is None else f"{r['mass_recall']:.3f} ({r['recall_at_k']:.2f}, "
                             f"{r['output_rel_err']:.2f}, {_f(r.get('tokens_attended'), '.0f')})")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    if sweep:
        out += ["Search settings (IceCache, pages basis):\n", sweep_table(sweep)]
    return "\n".join(out)


def _stack(per_layer, key) -> dict:
    return {k: np.stack([pl[key][k] for pl in per_layer]) for k in per_layer[0][key]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one context, three budgets, fewer steps")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="pinned model name or a local HF folder")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--no-real", action="store_true", help="synthetic sources only")
    ap.add_argument("--no-synthetic", action="store_true", help="real sources only")
    ap.add_argument("--contexts", type=int, nargs="+", help="override the preset's context lengths")
    ap.add_argument("--texts", nargs="+", choices=["essays", "passkey"], help="override the preset's real texts")
    ap.add_argument("--sink", type=int, help="sink tokens for every page method (default min(32, budget/4))")
    ap.add_argument("--window", type=int, help="window tokens for every page method (default min(32, budget/4))")
    ap.add_argument("--fov", type=int, help="IceCache search frontier (default: QueryParams' auto)")
    ap.add_argument("--prop-to-retrieve", type=float, default=QueryParams().prop_to_retrieve)
    ap.add_argument("--num-to-retrieve", type=int, default=QueryParams().num_to_retrieve)
    ap.add_argument("--search-threads", type=int, default=1,
                    help="numba threads for the index search while timing it (default 1: on a few shared cores "
                         "a parallel search waits on descheduled threads and its times scatter by 10x; 0: numba's "
                         "default)")
    ap.add_argument("--no-equal-tokens", action="store_true", help="skip the runs at IceCache's token count")
    ap.add_argument("--gqa-merge", choices=GQA_MERGES, default=DEFAULT_GQA_MERGE,
                    help="how the page methods share a KV head's pages among its query heads (the server's default)")
    ap.add_argument("--sweep-budget", type=int, default=256, help="budget of the search-settings sweep")
    ap.add_argument("--no-sweep", action="store_true", help="skip the search-settings sweep")
    ap.add_argument("--name", default="index_quality", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("--replot", metavar="JSON", help="redraw the PNG of a results file and exit")
    ap.add_argument("--table", metavar="JSON", help="print markdown tables of a results file and exit")
    args = ap.parse_args(argv)
    if args.replot or args.table:
        import json

        path = Path(args.replot or args.table)
        records = json.loads(path.read_text())
        sweep_path = path.with_name(path.name.replace(path.stem, _sweep_name(path.stem)))
        sweep = json.loads(sweep_path.read_text()) if sweep_path.exists() else None
        if args.replot:
            plot(records, path.with_suffix(".png"))
            if sweep:
                plot_sweep(sweep, sweep_path.with_suffix(".png"))
        else:
            print(markdown_tables(records, sweep=sweep))
        return
    if args.quick:
        contexts, budgets, steps, texts = [4096], [64, 256, 1024], 8, ["essays"]
    else:
        contexts, budgets, steps, texts = [4096, 8192, 16384], [64, 128, 256, 512, 1024, 2048], 16, ["essays", "passkey"]
    contexts = args.contexts or contexts
    if (args.sink is None) != (args.window is None):
        ap.error("--sink and --window go together")
    global SINK_WINDOW, GQA_MERGE
    SINK_WINDOW = (args.sink, args.window) if args.sink is not None else None
    GQA_MERGE = args.gqa_merge
    budgets = [b for b in budgets if SINK_WINDOW is None or b > sum(SINK_WINDOW)]
    if args.search_threads:
        import numba

        numba.set_num_threads(min(args.search_threads, numba.config.NUMBA_NUM_THREADS))
    threads = {"search_threads": args.search_threads or "numba default"}
    params = QueryParams(fov=args.fov, prop_to_retrieve=args.prop_to_retrieve, num_to_retrieve=args.num_to_retrieve)
    sweep = [] if args.no_sweep or args.sweep_budget not in budgets else SWEEP
    texts = args.texts or texts
    sources = [] if args.no_synthetic else [("synthetic-clustered", "clustered"), ("synthetic-lowrank", "lowrank")]
    if not args.no_real:
        sources += [(f"real:{args.model}", t) for t in texts]
    records, sweep_records = [], []
    sweep_name = _sweep_name(args.name)
    t0 = time.time()
    for source, kind in sources:
        for n in contexts:
            if source.startswith("synthetic"):
                layers = synthetic_layers(kind, n, steps, seed=n)
            else:
                layers = real_layers(args.model, kind, n, steps)
            results = [evaluate_layer_steps(K, V, Q, budgets, args.page_size, params=params,
                                            equal_tokens=not args.no_equal_tokens, sweep=sweep,
                                            sweep_budget=args.sweep_budget) for K, V, Q in layers]
            per_layer = [r[0] for r in results]
            ctx = int(layers[0][0].shape[1])
            new = []
            for key in per_layer[0]:
                method, budget, basis = key
                sw = sink_window(budget)
                base = {"source": source, "text": "" if source.startswith("synthetic") else kind,
                        "sink": sw[0], "window": sw[1], "context": ctx, "budget": budget, "budget_basis": basis,
                        "gqa_merge": GQA_MERGE,
                        "page_size": args.page_size, "method": method, "recall_k": RECALL_K,
                        "steps": steps, "n_layers": len(layers), **params_fields(params, ctx - sum(sw)), **threads}
                res = _stack(per_layer, key)
                okey = ("oracle_page", budget, "pages")
                orc = _stack(per_layer, okey) if okey in per_layer[0] else None
                new.append({**base, "layer": "mean", **summarize(res, orc, len(layers))})
                if len(layers) > 1:
                    for i in range(len(layers)):
                        f = summarize({k: v[i : i + 1] for k, v in res.items()},
                                      None if orc is None else {k: v[i : i + 1] for k, v in orc.items()}, 1)
                        f.pop("query_ms_per_step", None)
                        new.append({**base, "layer": i, **f})
            for key in results[0][1]:
                i, budget = key
                sw = sink_window(budget)
                res = {k: np.stack([r[1][key][k] for r in results]) for k in results[0][1][key]}
                orc = _stack(per_layer, ("oracle_page", budget, "pages"))
                sweep_records.append({"source": source, "text": "" if source.startswith("synthetic") else kind,
                                      "sink": sw[0], "window": sw[1], "context": ctx, "budget": budget,
                                      "budget_basis": "pages", "page_size": args.page_size, "method": "icecache",
                                      "steps": steps, "n_layers": len(layers), "layer": "mean",
                                      "setting": params_label(SWEEP[i]), **params_fields(SWEEP[i], ctx - sum(sw)),
                                      **threads,
                                      **summarize(res, orc, len(layers))})
            records += new
            _print_summary(new, budgets, time.time() - t0, source, kind, n)
            write_records(args.name, args.quick, records)  # partial results survive an interrupted run
            if sweep_records:
                write_records(sweep_name, args.quick, sweep_records)
    path = write_records(args.name, args.quick, records)
    plot(records, png_path(args.name, args.quick))
    print(f"wrote {path} and {png_path(args.name, args.quick)}")
    if sweep_records:
        spath = write_records(sweep_name, args.quick, sweep_records)
        plot_sweep(sweep_records, png_path(sweep_name, args.quick))
        print(f"wrote {spath} and {png_path(sweep_name, args.quick)}")
    print(markdown_tables(records, sweep=sweep_records))


def _sweep_name(name: str) -> str:
    """``index_quality[_quick]`` -> ``index_quality_sweep[_quick]``: the sweep's file beside the main one."""
    if name.endswith("_quick"):
        return name[: -len("_quick")] + "_sweep_quick"
    return name + "_sweep"


def _print_summary(new, budgets, elapsed, source, kind, n) -> None:
    mark = 256 if 256 in budgets else budgets[0]
    done = {(r["method"], r["budget_basis"]): r for r in new if r["layer"] == "mean" and r["budget"] == mark}
    summary = ", ".join(f"{m}{'' if b == 'pages' else '@tok'} {r['mass_recall']:.3f}/{r['tokens_attended']:.0f}t"
                        for (m, b), r in done.items())
    ice = done.get(("icecache", "pages"), {})
    print(f"[{elapsed:6.1f}s] {source} {kind} n={n}: mass/tokens@{mark}: {summary}", flush=True)
    if ice:
        print(f"          icecache: rel {ice.get('mass_rel_oracle_page', float('nan')):.3f}, p5 "
              f"{ice.get('mass_recall_p5', float('nan')):.3f}, top_page {ice.get('top_page_recall', float('nan')):.4f} "
              f"(own row {ice.get('top_page_recall_own_row', float('nan')):.4f}), query "
              f"{ice.get('query_ms', float('nan')):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
