"""The exact selection with a query-aware low-rank first pass (``selection: lowrank``, ``lowrank_pages``) beside
the full scan.

``index/lowrank.py``: once an index has answered ``FIT_AFTER`` queries it fits, per KV head, a rank-r map whitened
by the queries' second moment, keeps an int8 code of r values per page slot and a summary per page, scores the
codes (every page's, or with the page stage only those of the pages whose summaries, the mean code and the
tokens' spread, some query head ranks among its best ``stage x 4P``), and rescores each query head's best ``4 P``
pages exactly. Two parts, one run:

- **quality** on real post-RoPE Q/K (captured forward passes: SmolLM2-135M essays and passkey at 8000 tokens,
  Qwen2.5-Coder-0.5B essays and passkey at 16k; every layer from the third; the last 24 positions as decode
  steps, the first 10 feeding the fit, the next 14 measured), the index holding the context between the
  server's sink and recent window (both attended always, never indexed), int8 as the indexer builds it, the
  exact keys in a bfloat16 store as the server's: per (step, layer, query head) whether the exact best page (max over its
  tokens of q.k, from the exact keys) is selected (``top_page_recall``, after the GQA merge), the selection's
  attention mass over the indexed tokens relative to the exact scan's selection (``mass_vs_exact`` mean and
  5th percentile over (step, layer, KV head)), the share of a KV head's pages its candidates cover and the
  share whose codes the first pass read; for the default rank (``lowrank.default_rank``: 32 at head_dim 64)
  with page stages 1, 2, 4 and 8 where they apply, the default stage scoring the pages' mean codes alone
  (``spread_weight`` 0 instead of ``lowrank.SPREAD_WEIGHT``: the ablation), 2P candidates, d/4 and d/8, and
  with plain (not query-aware) PCA maps for contrast (``maps: keys``);
- **speed** on synthetic low-rank keys at Llama-3.1-8B's shape (8 KV heads, 32 query heads, d = 128, P = 12
  pages of 16), 8k / 32k / 128k tokens, interleaved step by step in one process on the same cores, each call
  after reading 96 MiB elsewhere (a server's other layers run between two calls of a layer): the
  exact selection the server runs today (``exact``: the tight scan of the int8 page copy + rescoring),
  ``lowrank`` (first pass + rescoring), ``lowrank_pages``, the first passes alone, and reading the int8 page
  copy once (the floor of any full scan); the share of the exact scan's pages each keeps; the bytes the codes
  add per token and layer (allocated); for ``lowrank`` and ``lowrank_pages`` at the default rank, each part's
  median time (``parts_ms_median``, ``lowrank.PARTS``) and for ``lowrank_pages`` the share of a KV head's pages
  its page stage marked (``marked_share``).

    python benchmarks/lowrank_scan.py [--quick] [--speed-only]

``--speed-only`` runs the speed part alone (no model, no captures; ``lowrank_scan_speed.json``): what the GPU
machine's 16-core host measures, where issue 14's "10x the tight scan" has more cores for both sides.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import replot, write_records  # noqa: E402
from index_quality import real_layers  # noqa: E402

import numba  # noqa: E402

from icecache_sglang.index import lowrank  # noqa: E402
from icecache_sglang.index.config import DEFAULT_GQA_MERGE, IndexConfig  # noqa: E402
from icecache_sglang.index.keys import to_storage  # noqa: E402
from icecache_sglang.index.paged_index import PagedDCIIndex  # noqa: E402
from icecache_sglang.index.scan import read_keys, scan_index  # noqa: E402
from icecache_sglang.index.synthetic import lowrank_keys  # noqa: E402

C = 16
STEPS, WARM = 24, 10
#: contexts long enough that a KV head's candidates are a minority of its pages (at 4k, 4P per query head of
#: SmolLM2's or Qwen's groups covered 40-60% of the pages and a 4k measurement said little); SmolLM2's
#: positions end at 8192
SOURCES = [("smollm2-135m-instruct", "essays", 8000), ("smollm2-135m-instruct", "passkey", 8000),
           ("qwen2.5-coder-0.5b-instruct", "essays", 16384), ("qwen2.5-coder-0.5b-instruct", "passkey", 16384)]
H_KV, H_Q, D, P = 8, 32, 128, 12


def quality(model: str, text: str, context: int, variants) -> list[dict]:
    layers = real_layers(model, text, context, STEPS)
    rows = []
    for li, (K, _V, Q) in enumerate(layers):
        if li < 2:
            continue
        # the index holds what lies between the sink and the recent window, as the server's (both are attended
        # always): keys are the context before the first decode position
        K = np.ascontiguousarray(K[:, SINK:K.shape[1] - WINDOW])
        H, n, d = K.shape
        g = Q.shape[1] // H
        store = to_storage(np.ascontiguousarray(K.transpose(1, 0, 2)), "bfloat16")  # the server's key store
        Kx = store.view(np.uint16).astype(np.uint32) << 16
        Kx = Kx.view(np.float32).transpose(1, 0, 2)  # [H, n, d]: the keys as the store holds them
        base = PagedDCIIndex(H, d, config=IndexConfig(page_size=C, key_dtype="int8"))
        base.build(K)
        for label, rank, factor, maps, stage, *spread in variants(d):
            weight = spread[0] if spread else lowrank.SPREAD_WEIGHT
            X = factor * P_REAL
            if stage and not lowrank.uses_page_stage(base, X, stage):
                continue  # the page stage marks too large a share of these pages: every token would be scored
            idx = base.copy()  # maps "keys": a plain PCA of the keys, the contrast the query-aware maps beat
            idx.lowrank = lowrank.LowRankState(H, d, rank, query_aware=maps == "query")
            for step in range(STEPS):
                q = np.ascontiguousarray(Q[step], np.float32)
                got = lowrank.scan_index_lowrank(idx, q, P_REAL, store, merge=DEFAULT_GQA_MERGE, rescore=X,
                                                 min_tokens=0, page_stage=stage, spread_weight=weight)
                if step < WARM:
                    continue
                assert idx.lowrank.ready(), "the fit is not active after the warm-up"
                ref = scan_index(idx, q, P_REAL, merge=DEFAULT_GQA_MERGE, store=store)
                cand, _ = lowrank.candidates(idx, q, X, stage, spread_weight=weight)
                live = [idx.live_pages(h).size for h in range(H)]
                cover = [np.unique(cand[h * g:(h + 1) * g]).size / live[h] for h in range(H)]
                scored = np.ones(H)
                if stage:
                    f = idx.lowrank.active
                    Qr, qmu = lowrank.project_queries(q, f.mean, f.qmap)
                    use = lowrank.summary_pages(f.summary, idx.page_cell, idx.page_fill, idx.next_page, Qr, qmu,
                                                stage * X, 1, weight)
                    scored = use.sum(axis=1) / np.array(live)
                assert 2 * X * g <= idx.next_page.min(), "the server would scan exactly here"
                extra = {"page_stage": stage, "pages_per_row": stage * X, "pages_per_head": float(np.mean(live)),
                         "candidates": factor, "rank": rank, "maps": maps, "spread_weight": weight}
                rows += [r | extra | {"candidate_share": c, "scored_share": float(sc)}
                         for r, c, sc in zip(_score(li, step, label, got, ref, idx, Kx, q, g), cover, scored)]
    return rows


def _score(layer, step, label, got, ref, idx, Kx, q, g) -> list[dict]:
    out = []
    d = Kx.shape[2]
    for h in range(idx.H):
        live = idx.live_pages(h)
        toks = idx.page_tok[h, live]  # [pages, C] token ids (-1 padded); ids are positions here
        valid = toks >= 0
        keys = Kx[h][np.maximum(toks, 0)]  # [pages, C, d]
        qh = q[h * g:(h + 1) * g]
        exact = np.where(valid[None], np.einsum("gd,pcd->gpc", qh, keys), -np.inf).max(2)  # [g, pages]
        best = live[np.argmax(exact, axis=1)]
        logits = qh @ Kx[h].T / np.sqrt(d)
        pr = np.exp(logits - logits.max(1, keepdims=True))
        pr /= pr.sum(1, keepdims=True)

        def mass(pages):
            pages = pages[pages >= 0]
            t = idx.page_tok[h, pages].ravel()
            return pr[:, t[t >= 0]].sum(1)

        out.append({"layer": layer, "step": step, "method": label, "top_page_hits": int(np.isin(best, got[h]).sum()),
                    "cases": g, "mass_vs_exact": float(np.mean(mass(got[h]) / np.maximum(mass(ref[h]), 1e-12)))})
    return out


def _fitted(idx, Qs, store, rank=None) -> int:
    """Ask ``idx`` queries until its codes cover every token (a fit encodes ``FIT_CHUNK`` tokens per query);
    returns how many it took."""
    for i, q in enumerate(Qs):
        lowrank.scan_index_lowrank(idx, q, P, store, merge=DEFAULT_GQA_MERGE, rank=rank, min_tokens=0)
        if idx.lowrank is not None and idx.lowrank.ready():
            return i + 1
    raise RuntimeError("the fit did not finish")


#: bytes read before every timed call: more than this machine's last-level cache (32 MiB), so each call finds
#: its codes, summaries and keys in memory, as a server's layer does after the other layers' calls (the methods
#: here share one index's codes: interleaved without this, each found what the one before had read)
EVICT_BYTES = 96 << 20


@functools.cache
def _evict_buffer() -> np.ndarray:
    return np.ones(EVICT_BYTES // 8, np.int64)


def evict_caches() -> None:
    _evict_buffer().sum()


def _timed(calls: list | None, ix, q, store, stage: int):
    """A first-pass call at page stage ``stage``, its parts' seconds appended to ``calls`` (None: not timed)."""
    t = None if calls is None else {}
    out = lowrank.scan_index_lowrank(ix, q, P, store, merge=DEFAULT_GQA_MERGE, min_tokens=0, page_stage=stage,
                                     timings=t)
    if calls is not None:
        calls.append(t)
    return out


def _marked_share(ix, Qs, X) -> float:
    """The mean share of a KV head's pages the page stage marks over the queries ``Qs`` (``lowrank.candidates``'s
    own stage, recomputed here)."""
    f = ix.lowrank.active
    shares = []
    for q in Qs:
        Qr, qmu = lowrank.project_queries(np.ascontiguousarray(q, np.float32), f.mean, f.qmap)
        use = lowrank.summary_pages(f.summary, ix.page_cell, ix.page_fill, ix.next_page, Qr, qmu,
                                    lowrank.PAGE_STAGE_FACTOR * X, 1)
        shares.append(use.sum() / ix.next_page.sum())
    return float(np.mean(shares))


def speed(contexts, reps: int, ranks) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    threads = numba.get_num_threads()
    for n in contexts:
        K, Qs = lowrank_keys(rng, n, D, rank=16, n_queries=reps + 32, heads=H_KV, group=H_Q // H_KV)
        store = to_storage(np.ascontiguousarray(K.transpose(1, 0, 2)), "bfloat16")
        idx = PagedDCIIndex(H_KV, D, config=IndexConfig(page_size=C, key_dtype="int8"))
        idx.build(K)
        coded = {}
        for r in ranks:  # the codes started by hand: below MIN_TOKENS the server scans exactly
            coded[r] = idx.copy()
            coded[r].lowrank = lowrank.LowRankState(H_KV, D, r)
            warm = _fitted(coded[r], Qs[:32], store, rank=r)
        scan_index(idx, Qs[0], P, merge=DEFAULT_GQA_MERGE, store=store)  # compile
        read_keys(idx.page_keys, idx.next_page, idx.page_fill)
        ops = [("exact", None, lambda q: scan_index(idx, q, P, merge=DEFAULT_GQA_MERGE, store=store)),
               ("read", None, lambda q: read_keys(idx.page_keys, idx.next_page, idx.page_fill))]
        X = lowrank.lowrank_rescore_count(P)
        r0 = lowrank.default_rank(D)
        # where a call's time goes (``lowrank.PARTS``), at the default rank with and without the page stage
        parts = {("lowrank", r0): [], ("lowrank_pages", r0): []}
        for r, ix in coded.items():
            ops += [("lowrank", r, lambda q, ix=ix, r=r: _timed(parts.get(("lowrank", r)), ix, q, store, 0)),
                    ("first_pass", r, lambda q, ix=ix: lowrank.candidates(ix, q, X))]
        ix = coded[r0]
        # the trade-off (the quality part measures the same settings on real Q/K): page stages 1-8 and half
        # the candidates, at the default rank; "lowrank_pages" is the selection's own setting
        meta = {("lowrank", r): {"page_stage": 0, "candidates": 4} for r in ranks}
        meta[("lowrank_2P", r0)] = {"page_stage": 0, "candidates": 2}
        ops.append(("lowrank_2P", r0, lambda q: lowrank.scan_index_lowrank(ix, q, P, store, merge=DEFAULT_GQA_MERGE,
                                                                           min_tokens=0, rescore=2 * P)))
        for k in (1, 2, 4, 8):
            if not lowrank.uses_page_stage(ix, X, k):
                continue
            name = "lowrank_pages" if k == lowrank.PAGE_STAGE_FACTOR else f"lowrank_pages_stage{k}"
            meta[(name, r0)] = {"page_stage": k, "candidates": 4}
            if (name, r0) in parts:
                ops.append((name, r0, lambda q, k=k: _timed(parts[("lowrank_pages", r0)], ix, q, store, k)))
            else:
                ops.append((name, r0, lambda q, k=k: lowrank.scan_index_lowrank(ix, q, P, store, min_tokens=0,
                                                                                merge=DEFAULT_GQA_MERGE, page_stage=k)))
            if k == lowrank.PAGE_STAGE_FACTOR:
                ops.append(("first_pass_pages", r0, lambda q: lowrank.candidates(ix, q, X, lowrank.PAGE_STAGE_FACTOR)))
        t = {(op, r): [] for op, r, _ in ops}
        agree = {key: [] for key in meta if key in t}
        for q in Qs[32:]:  # interleaved: every method sees the same machine state
            out = {}
            for op, r, fn in ops:
                evict_caches()  # as in a server, where the other layers' calls run between two of a layer's
                s = time.perf_counter()
                out[(op, r)] = fn(q)
                t[(op, r)].append(time.perf_counter() - s)
            for k in agree:  # the share of the exact scan's pages selected (synthetic keys: no semantic structure)
                agree[k].append(np.mean([np.isin(out[("exact", None)][h], out[k][h]).mean() for h in range(H_KV)]))
        med = {k: float(np.median(v)) for k, v in t.items()}
        base = {"part": "speed", "context": n, "heads": H_KV, "q_heads": H_Q, "head_dim": D, "pages": P,
                "threads": threads, "reps": reps, "evict_bytes_before_each_call": EVICT_BYTES,
                "key_bytes_per_token_layer": H_KV * D * 2,
                "index_bytes_per_token_layer": idx.nbytes() / idx.n_live, "queries_to_fit": warm,
                "server_uses_lowrank_from_tokens": lowrank.MIN_TOKENS}
        for (op, r), v in med.items():
            # the codes' bytes as allocated (page-ordered slots, summaries, versions, maps), not computed
            extra = {} if r is None else {"rank": r, "code_bytes_per_token_layer": coded[r].lowrank.nbytes() / idx.n_live,
                                          "index_bytes_per_token_layer": coded[r].nbytes() / idx.n_live}
            if (op, r) in agree:
                extra["pages_as_exact"] = float(np.mean(agree[(op, r)]))
                extra.update(meta[(op, r)])
            if parts.get((op, r)):  # each part's median over the calls (their sum is near the call's median)
                extra["parts_ms_median"] = {k: float(np.median([c.get(k, 0.0) for c in parts[(op, r)]])) * 1e3
                                            for k in lowrank.PARTS}
                if op == "lowrank_pages":  # the share of a KV head's pages whose codes its page stage marked
                    extra["marked_share"] = _marked_share(ix, Qs[32:], X)
            records.append({**base, **extra, "op": op, "seconds_median": v, "speedup_vs_exact": med[("exact", None)] / v})
        line = f"{n:7d}  exact {med[('exact', None)] * 1e3:7.2f} ms  read int8 copy {med[('read', None)] * 1e3:6.2f} ms"
        for r in ranks:
            line += (f"  | r={r}: lowrank {med[('lowrank', r)] * 1e3:6.2f} ms "
                     f"({med[('exact', None)] / med[('lowrank', r)]:.2f}x), first pass {med[('first_pass', r)] * 1e3:5.2f} ms")
        if ("lowrank_pages", r0) in med:
            line += (f"  | lowrank_pages {med[('lowrank_pages', r0)] * 1e3:6.2f} ms "
                     f"({med[('exact', None)] / med[('lowrank_pages', r0)]:.2f}x), its first pass "
                     f"{med[('first_pass_pages', r0)] * 1e3:5.2f} ms, the exact scan's pages "
                     f"{np.mean(agree[('lowrank_pages', r0)]):.3f} (lowrank {np.mean(agree[('lowrank', r0)]):.3f})")
        print(line, flush=True)
        for key, calls in parts.items():
            if calls:
                print(f"{'':7s}  {key[0]} parts (ms, median): " + ", ".join(
                    f"{k} {np.median([c.get(k, 0.0) for c in calls]) * 1e3:.2f}" for k in lowrank.PARTS), flush=True)
    return records


def summarize(rows: list[dict], source: str) -> list[dict]:
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        masses = np.array([r["mass_vs_exact"] for r in rs])
        out.append({"part": "quality", "source": source, "method": m, "pages": P_REAL, "sink": SINK, "window": WINDOW,
                    "page_stage": rs[0]["page_stage"], "pages_per_row": rs[0]["pages_per_row"],
                    "candidates": rs[0]["candidates"], "rank": rs[0]["rank"], "maps": rs[0]["maps"],
                    "spread_weight": rs[0]["spread_weight"],
                    "pages_per_head": float(np.mean([r["pages_per_head"] for r in rs])),
                    "scored_share_mean": float(np.mean([r["scored_share"] for r in rs])),
                    "top_page_recall": sum(r["top_page_hits"] for r in rs) / sum(r["cases"] for r in rs),
                    "mass_vs_exact_mean": float(masses.mean()), "mass_vs_exact_p5": float(np.percentile(masses, 5)),
                    "cases": sum(r["cases"] for r in rs), "steps_measured": STEPS - WARM,
                    "candidate_share_mean": float(np.mean([r["candidate_share"] for r in rs]))})
    return out


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(18, 4.6))
    sp = [r for r in records if r["part"] == "speed"]
    names = {"exact": "exact (full int8 scan + rescoring)", "lowrank": "lowrank r={} (first pass + rescoring)",
             "first_pass": "lowrank r={}: first pass alone", "read": "read the int8 page copy once",
             "lowrank_pages": "lowrank_pages r={} (page stage + first pass + rescoring)",
             "first_pass_pages": "lowrank_pages r={}: page stage + first pass alone"}
    series = dict.fromkeys((r["op"], r.get("rank")) for r in sp if r["op"] in names)
    for i, (op, rank) in enumerate(series):
        pts = sorted((r["context"], r["seconds_median"] * 1e3) for r in sp if r["op"] == op and r.get("rank") == rank)
        a.plot(*zip(*pts), {"exact": "s--", "lowrank": "o-", "first_pass": "v:", "read": "^:", "lowrank_pages": "D-",
                            "first_pass_pages": "d:"}[op],
               color=f"C{i}", label=names[op].format(rank))
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("context tokens")
    a.set_ylabel("ms per decode step per layer")
    a.set_title(f"one layer: {H_KV} KV / {H_Q} q heads, d={D}, P={P} (synthetic keys, measured)", fontsize=9)
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    q = [r for r in records if r["part"] == "quality"]
    srcs = list(dict.fromkeys(r["source"] for r in q))
    methods = list(dict.fromkeys(r["method"] for r in q))
    w = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        b.bar(np.arange(len(srcs)) + i * w, [next((r["top_page_recall"] for r in q if r["source"] == s and r["method"] == m),
                                                  np.nan) for s in srcs], w, label=m)
    b.axhline(0.99, color="red", lw=0.8)
    low = min((r["top_page_recall"] for r in q), default=0.85)
    b.set_ylim(min(0.85, np.floor(low * 20 - 0.5) / 20), 1.005)  # every bar's top in view
    b.set_xticks(np.arange(len(srcs)) + 0.4 - w / 2)
    b.set_xticklabels([s.replace("-instruct", "").replace(" ", "\n") for s in srcs], fontsize=6)
    b.set_ylabel("top-page recall (after the GQA merge)")
    b.set_title("real Q/K: is each query head's exact best page selected? (computed)", fontsize=9)
    if methods:  # (none in a --speed-only run)
        b.legend(fontsize=5, loc="lower left")
    # the trade-off: a setting's time at the longest context (synthetic keys, measured) against its top-page
    # recall on each real source where the setting applies (computed): two sources of data, one point per pair
    n_max = max((r["context"] for r in sp), default=0)
    timed = {(r["page_stage"], r["candidates"]): r["seconds_median"] * 1e3 for r in sp
             if r["context"] == n_max and "candidates" in r and r.get("rank") == max(x.get("rank") or 0 for x in sp)}
    exact_ms = next((r["seconds_median"] * 1e3 for r in sp if r["context"] == n_max and r["op"] == "exact"), None)
    for i, src in enumerate(srcs):
        pts = sorted((timed[(r["page_stage"], r["candidates"])], r["top_page_recall"], r["page_stage"], r["candidates"])
                     for r in q if r["source"] == src and r.get("maps") == "query" and r.get("rank") == 32
                     and not (r.get("page_stage") and r.get("spread_weight") == 0)  # the ablation
                     and (r.get("page_stage"), r.get("candidates")) in timed)
        if pts:
            c.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=src)
            for x, y, k, cand in pts:
                c.annotate(f"stage {k}, {cand}P" if k else f"every code, {cand}P", (x, y), fontsize=6,
                           textcoords="offset points", xytext=(3, 3))
    if exact_ms:
        c.axvline(exact_ms, color="gray", ls="--", lw=0.8, label=f"exact scan ({exact_ms:.1f} ms)")
        c.axvline(exact_ms / 10, color="red", ls=":", lw=0.8, label="10x the exact scan (issue 14)")
    c.axhline(0.99, color="red", lw=0.8)
    c.set_xscale("log")
    c.set_xlabel(f"ms per decode step per layer at {n_max // 1024}k (synthetic keys, measured)")
    c.set_ylabel("top-page recall on real Q/K (computed)")
    c.set_title("speed vs the decisive page: lowrank settings (r = 32)", fontsize=9)
    c.legend(fontsize=6)
    c.grid(alpha=0.3)
    if records and "machine" in records[0]:
        fig.suptitle(f"{records[0]['machine']}: {records[0]['command']}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


P_REAL = (256 - 64) // C  # the 256-token budget less sink and window
SINK, WINDOW = 32, 32  # the server's sink_tokens and window_tokens: attended always, never indexed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one source, contexts 8k and 32k")
    ap.add_argument("--replot", action="store_true", help="redraw the figures from the records on disk")
    ap.add_argument("--speed-only", action="store_true",
                    help="the speed table alone (synthetic keys, no model: the GPU machine's 16-core host, where "
                    "issue 14's 10x over the scan is to be judged); records in lowrank_scan_speed[_quick].json")
    args = ap.parse_args(argv)
    name = "lowrank_scan_speed" if args.speed_only else "lowrank_scan"
    if args.replot:
        return replot(name, plot)

    def variants(d):
        r = lowrank.default_rank(d)
        out = [(f"query-aware r={r} (default), 4P", r, 4, "query", 0)]
        # lowrank_pages: the tokens of the pages some row ranks among its best 4P x stage by summary (default
        # stage 4, 16P); a stage applies where a head has 4x as many pages
        out += [(f"page stage {k}: {4 * k}P per row{' (lowrank_pages)' if k == lowrank.PAGE_STAGE_FACTOR else ''}",
                 r, 4, "query", k) for k in (1, 2, 4, 8)]
        # the ablation: the default page stage scoring the pages' mean codes alone (no spread)
        out += [(f"page stage {lowrank.PAGE_STAGE_FACTOR}, mean codes alone", r, 4, "query",
                 lowrank.PAGE_STAGE_FACTOR, 0.0)]
        out += [(f"query-aware r={r}, 2P", r, 2, "query", 0),
                (f"query-aware r={d // 4}, 4P", d // 4, 4, "query", 0),
                (f"query-aware r={d // 8}, 4P", d // 8, 4, "query", 0),
                (f"keys' PCA (queries ignored) r={r}, 4P", r, 4, "keys", 0)]
        return out[:3] if args.quick else out

    records = []
    for model, text, ctx in [] if args.speed_only else (SOURCES[:1] if args.quick else SOURCES):
        src = f"{model} {text} {ctx // 1024}k"
        recs = summarize(quality(model, text, ctx, variants), src)
        records += recs
        for r in recs:
            print(f"{src:40s} {r['method']:36s} top-page {r['top_page_recall']:.4f}  mass {r['mass_vs_exact_mean']:.4f}"
                  f" (p5 {r['mass_vs_exact_p5']:.3f})  candidates {r['candidate_share_mean']:.3f} of the pages, "
                  f"tokens of {r['scored_share_mean']:.3f} scored", flush=True)
    records += speed([8192, 32768] if args.quick else [8192, 32768, 131072], 7 if args.quick else 21,
                     (D // 8, lowrank.default_rank(D)))
    write_records(name, args.quick, records)
    replot(name, plot)  # from the records written (they carry the machine and the command)


if __name__ == "__main__":
    main()
