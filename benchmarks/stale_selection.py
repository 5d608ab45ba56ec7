"""Attention mass of stale selections on real Q/K (issue 16): pages selected with the queries of an earlier
decode step, scored against the attention of the current one.

Real post-RoPE Q/K of a model over essay text (``index_quality.real_layers``: the last ``steps`` positions
act as decode queries over the context before them, every layer but the first two). Per layer, IceCache's
pages are built once; each step ``s`` selects at a 256-token budget (sink + window + pages, as the server)
with the query of step ``s - age`` and is scored with step ``s``'s attention probabilities:

- ``async{k}``: age ``k`` at every step (``max_stale_steps: k`` when the indexer is slower than a step: the
  worst case of the bound; the server uses fresher answers when they are in);
- ``every{k}``: ages ``0 .. k-1`` in turn (``step_reuse: k``);
- ``sync``: age 0;
- ``adaptive{tau}``: the previous step's selection unless a query head's cosine to the query that made it is
  below tau (then the fresh one): whether a drift test could keep staleness where it is cheap;
- ``async{k}+rerank{m}`` (``exact`` only; a design measured, not built): the stale query picks ``m`` times
  the budget's pages and step ``s``'s own query keeps the budget's pages among them by exact score (the
  same merge): what a re-ranking of pages on the device, where the current query is at no cost, would recover;
- ``async{k}+tokens{m}`` (``exact`` only; the server's ``token_rerank: m``, ``runtime/rerank.py``): the same
  candidates, and step ``s``'s query keeps the budget's best tokens among theirs (``n_pages * page_size``
  of them: a little more than the synchronous pages, which are not all full; ``tokens_attended``).

Two selections: ``exact`` (IceCache's pages ranked by exact score: the server's default) and ``icecache``
(the M-DCI search). Records: mean attention-mass recall, its ratio to the synchronous selection's (mean over
(step, layer) and the 5th percentile), and the share of (step, layer, query head) cases whose
highest-attention token is selected (``top_token_recall``). The keys are the same at every step (the steps' own new tokens are not in
the index; the server attends to them in full after a reused selection, so this is the harder case).

    python benchmarks/stale_selection.py           # SmolLM2-135M 4k and Qwen2.5-Coder-0.5B 4k, 24 steps
    python benchmarks/stale_selection.py --quick   # SmolLM2 4k, 16 steps
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, write_records  # noqa: E402
from index_quality import make_policy, real_layers  # noqa: E402

from icecache_sglang.index.metrics import attention_probs, mass_recall_per_head, top_token_hits  # noqa: E402

NAME = "stale_selection"
BUDGET, PAGE = 256, 16
AGES = {"sync": lambda s: 0, **{f"async{k}": (lambda s, k=k: k) for k in (1, 2, 4, 8)},
        **{f"every{k}": (lambda s, k=k: s % k) for k in (2, 4, 8)}}
FIRST = 8  # steps before this have no query 8 steps back: not scored
TAUS = (0.7, 0.8, 0.9, 0.95)  # adaptive: refresh when a query head's cosine to the selection's query is below
RERANK = ((1, 2), (1, 3), (4, 2), (4, 3))  # (age, candidates as a multiple of the budget's pages)
RERANK_TOKENS = ((0, 2), (1, 2), (1, 3), (4, 2), (4, 3))  # the same for token re-ranking (age 0: synchronous)


class PageScores:
    """Each step's exact page scores per KV head ``[g, pages]`` over an ``oracle_page`` policy's pages (inside
    its sink/window wrapper), and selections re-ranked among a stale query's candidates."""

    def __init__(self, sw, queries):
        op = sw.inner
        self.sw, self.op, self.idx = sw, op, op.index
        H, d = self.idx.H, queries.shape[2]
        g = queries.shape[1] // H
        self.d = d
        self.pages = []
        for h in range(H):
            live = self.idx.live_pages(h)
            toks = self.idx.page_tok[h, live]
            valid = np.arange(self.idx.C)[None, :] < self.idx.page_fill[h, live][:, None]
            self.pages.append((live, np.where(valid, toks, 0), valid))
        self._keys_t = None  # the keys as ``[slots, H, d]`` for token re-ranking, made once
        self.scores = [[np.where(v[None], (q[h * g:(h + 1) * g].astype(np.float32) @ op.keys[h].T)[:, t], -np.inf)
                        .max(axis=2) for h, (_, t, v) in enumerate(self.pages)] for q in queries]

    def _candidates(self, h: int, old: int, n_pages: int, mult: int) -> np.ndarray:
        """KV head ``h``'s ``mult x n_pages`` best pages by step ``old``'s query (columns of ``self.pages[h]``)."""
        cand = self.op.merge_pages(self.scores[old][h], mult * n_pages, self.d)
        return cand[cand >= 0]

    def _with_fixed(self, pos: np.ndarray) -> np.ndarray:
        """Index positions plus the sink and window, as positions of the whole sequence."""
        sw = self.sw
        return np.concatenate([np.arange(sw.lo), np.sort(pos) + sw.lo, np.arange(sw.hi, sw.n)])

    def rerank_tokens(self, queries, old: int, now: int, n_pages: int, mult: int) -> list[np.ndarray]:
        """``token_rerank: mult`` as the server runs it (``runtime/rerank.py``, its float64 reference)."""
        import torch

        from icecache_sglang.runtime.rerank import rerank_tokens_reference

        if self._keys_t is None:  # the K plane as the server holds it, [slots, H, d]
            self._keys_t = torch.from_numpy(np.ascontiguousarray(self.op.keys.transpose(1, 0, 2)))
        H = len(self.pages)
        cands = [self.idx.pages_to_positions(h, live[self._candidates(h, old, n_pages, mult)])
                 for h, (live, _, _) in enumerate(self.pages)]
        cand = np.full((1, H, max(len(c) for c in cands)), -1, np.int64)
        for h, c in enumerate(cands):
            cand[0, h, :len(c)] = c
        kept = rerank_tokens_reference(torch.from_numpy(queries[now][None]), self._keys_t, torch.from_numpy(cand),
                                       n_pages * PAGE, 1.0 / np.sqrt(self.d))[0]
        return [self._with_fixed(kept[h][kept[h] >= 0]) for h in range(H)]

    def rerank(self, old: int, now: int, n_pages: int, mult: int) -> list[np.ndarray]:
        out = []
        for h, (live, _, _) in enumerate(self.pages):
            cand = self._candidates(h, old, n_pages, mult)
            keep = self.op.merge_pages(self.scores[now][h][:, cand], n_pages, self.d)
            out.append(self._with_fixed(self.idx.pages_to_positions(h, live[cand[keep[keep >= 0]]])))
        return out

def evaluate(layers, steps: int) -> dict:
    """{(selection, mode): {"mass": [...], "ratio": [...], "top": [...]}} over (step, layer)."""
    out: dict = {}
    for keys, _values, queries in layers:
        ice = make_policy("icecache", BUDGET, PAGE)
        ice.build(keys)
        exact = make_policy("oracle_page", BUDGET, PAGE, ice.inner.index)
        exact.build(keys)
        chosen = {name: [pol.select(q, BUDGET) for q in queries]  # per step: per KV head, positions
                  for name, pol in (("exact", exact), ("icecache", ice))}
        pages = PageScores(exact, queries) if exact.has_middle else None
        n_pages = (BUDGET - exact.lo - (exact.n - exact.hi)) // PAGE
        for s in range(FIRST, steps):
            probs = attention_probs(queries[s], keys)
            # adaptive: the selection of step s-1 unless a query head turned away from the query that made it
            # (cosine below tau: then wait for the fresh one, age 0)
            qa, qb = queries[s], queries[s - 1]
            cos = (qa * qb).sum(-1) / np.maximum(np.linalg.norm(qa, axis=-1) * np.linalg.norm(qb, axis=-1), 1e-12)
            for sel_name, sels in chosen.items():
                base = mass_recall_per_head(probs, sels[s]).mean()

                def score(mode: str, src: int, sel=None, **extra) -> None:
                    """Step ``s`` attending with the selection made at step ``src`` (or ``sel``)."""
                    sel = sels[src] if sel is None else sel
                    mass = mass_recall_per_head(probs, sel).mean()
                    r = out.setdefault((sel_name, mode), {"mass": [], "ratio": [], "top": []})
                    r["mass"].append(float(mass))
                    r["ratio"].append(float(mass / max(base, 1e-12)))
                    r["top"].append(float(top_token_hits(probs, sel).mean()))
                    r.setdefault("tokens", []).append(float(np.mean([len(x) for x in sel])))
                    for k, v in extra.items():
                        r.setdefault(k, []).append(v)

                for tau in TAUS:
                    fresh = bool(cos.min() < tau)
                    score(f"adaptive{tau}", s if fresh else s - 1, fresh=float(fresh))
                for mode, age in AGES.items():
                    score(mode, s - age(s))
                if sel_name == "exact" and pages is not None:
                    for age, mult in RERANK:
                        score(f"async{age}+rerank{mult}", s - age, pages.rerank(s - age, s, n_pages, mult))
                    for age, mult in RERANK_TOKENS:
                        score(f"async{age}+tokens{mult}", s - age,
                              pages.rerank_tokens(queries, s - age, s, n_pages, mult))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    plan = [("smollm2-135m-instruct", 4096)] if args.quick else [("smollm2-135m-instruct", 4096),
                                                                 ("qwen2.5-coder-0.5b-instruct", 4096)]
    steps = 16 if args.quick else 24
    records = []
    for model, n in plan:
        t0 = time.monotonic()
        layers = real_layers(model, "essays", n, steps)[2:]  # the server's 2 dense layers left out
        res = evaluate(layers, steps)
        for (sel_name, mode), r in res.items():
            rec = {"model": model, "context": n, "budget": BUDGET, "selection": sel_name, "mode": mode,
                   "steps_scored": steps - FIRST, "layers": len(layers), "mass_recall": float(np.mean(r["mass"])),
                   "mass_rel_sync": float(np.mean(r["ratio"])), "mass_rel_sync_p5": float(np.percentile(r["ratio"], 5)),
                   "top_token_recall": float(np.mean(r["top"])), "tokens_attended": float(np.mean(r["tokens"])),
                   "fresh_share": float(np.mean(r["fresh"])) if "fresh" in r else None}
            print(rec, flush=True)
            records.append(rec)
        print(f"{model}: {time.monotonic() - t0:.0f} s", flush=True)
    out = write_records(NAME, args.quick, records)
    plot(records, png_path(NAME, args.quick))
    print(f"wrote {out}")


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for sel_name, style in (("exact", "o-"), ("icecache", "s--")):
            rs = [r for r in records if r["model"] == model and r["selection"] == sel_name]
            names = [r["mode"] for r in rs]
            ax.plot(names, [r["mass_rel_sync"] for r in rs], style, label=f"{sel_name}: mean")
            ax.plot(names, [r["mass_rel_sync_p5"] for r in rs], style, alpha=0.4, label=f"{sel_name}: p5")
        ax.axhline(0.99, color="gray", lw=0.8, ls=":")
        ax.set_title(f"{model}, 4k, budget {BUDGET}: attention mass vs synchronous (measured)", fontsize=9)
        ax.tick_params(axis="x", rotation=45)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
