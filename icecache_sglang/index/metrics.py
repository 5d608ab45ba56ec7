"""Quality of a token selection against dense attention (evaluation.md "What to measure").

All functions take one layer's keys ``[H_kv, n, d]`` (values ``[H_kv, n, dv]``), or the attention
probabilities of one step's query heads ``[H_q, n]`` (query head ``i`` on KV head ``i // group``), and
the selected positions per KV head. The first group returns the mean over query heads; the second keeps
the query heads apart, counts a selection's tokens and asks whether each head's best page was selected.
"""

from __future__ import annotations

import numpy as np


def attention_probs(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """softmax(q.K / sqrt(d)) per query head: ``[H_q, n]`` (float64)."""
    H, n, d = keys.shape
    g = queries.shape[0] // H
    q = queries.astype(np.float64)
    logits = np.concatenate([q[h * g : (h + 1) * g] @ keys[h].T.astype(np.float64) for h in range(H)]) / np.sqrt(d)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def _masks(selected: list[np.ndarray], n: int, group: int) -> np.ndarray:
    m = np.zeros((len(selected) * group, n), dtype=bool)
    for h, sel in enumerate(selected):
        m[h * group : (h + 1) * group, np.asarray(sel, dtype=np.int64)] = True
    return m


def mass_recall(probs: np.ndarray, selected: list[np.ndarray]) -> float:
    """Attention mass that falls on the selected tokens."""
    return float(mass_recall_per_head(probs, selected).mean())


def recall_at_k(probs: np.ndarray, selected: list[np.ndarray], k: int) -> float:
    """Share of each query head's true top-k tokens that were selected."""
    g = probs.shape[0] // len(selected)
    k = min(k, probs.shape[1])
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    m = _masks(selected, probs.shape[1], g)
    return float(np.take_along_axis(m, top, axis=1).mean())


def dense_output(probs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Dense attention output per query head: ``[H_q, dv]``."""
    H = values.shape[0]
    g = probs.shape[0] // H
    return np.concatenate([probs[h * g : (h + 1) * g] @ values[h].astype(np.float64) for h in range(H)])


def output_rel_err(probs: np.ndarray, values: np.ndarray, selected: list[np.ndarray],
                   dense: np.ndarray | None = None) -> float:
    """``|o_sparse - o_dense| / |o_dense|``: softmax renormalised over the selected tokens.
    ``dense`` (from :func:`dense_output`) may be passed in when several selections share a step."""
    H = values.shape[0]
    g = probs.shape[0] // H
    if dense is None:
        dense = dense_output(probs, values)
    errs = []
    for h, sel in enumerate(selected):
        sel = np.asarray(sel, dtype=np.int64)
        p = probs[h * g : (h + 1) * g][:, sel]  # [g, m]
        z = p.sum(axis=1, keepdims=True)
        o = np.divide(p @ values[h][sel].astype(np.float64), z, out=np.zeros((g, values.shape[2])), where=z > 0)
        ref = dense[h * g : (h + 1) * g]
        errs.append(np.linalg.norm(o - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30))
    return float(np.concatenate(errs).mean())


# ---------------------------------------------------------------- per-case views, budgets and top pages
#
# The functions above average over query heads. The ones below keep the cases apart (a mean hides the
# query heads a selection fails), count what a selection costs in tokens, and ask whether each query
# head's single best page (what decides a retrieval answer) was selected.


def mass_recall_per_head(probs: np.ndarray, selected: list[np.ndarray]) -> np.ndarray:
    """Attention mass on the selected tokens for each query head: ``[H_q]`` (mean: :func:`mass_recall`)."""
    g = probs.shape[0] // len(selected)
    return (probs * _masks(selected, probs.shape[1], g)).sum(axis=1)


def tokens_per_head(selected: list[np.ndarray]) -> np.ndarray:
    """Distinct token positions each KV head's selection covers (what its attention reads): ``[H_kv]``."""
    return np.array([np.unique(np.asarray(s, dtype=np.int64)).size for s in selected], dtype=np.int64)


def tokens_attended(selected: list[np.ndarray]) -> float:
    """Mean over KV heads of :func:`tokens_per_head`: the token cost of a selection, so that methods whose
    pages are not all full (IceCache's) are compared with full positional pages at equal tokens."""
    return float(tokens_per_head(selected).mean()) if len(selected) else 0.0


def page_max_scores(queries: np.ndarray, keys: np.ndarray, page_pos: np.ndarray) -> np.ndarray:
    """Exact page scores of one KV head: ``max`` over each page's tokens of ``q . k`` (float64), the score
    an index ranks pages by. ``queries [g, d]``, ``keys [n, d]``, ``page_pos [L, C]`` positions into ``keys``
    with ``-1`` padding (a page without tokens scores ``-inf``) -> ``[g, L]``."""
    page_pos = np.asarray(page_pos, dtype=np.int64)
    if page_pos.ndim != 2:
        raise ValueError(f"page_pos must be [pages, page_size], got shape {page_pos.shape}")
    scores = np.asarray(queries, dtype=np.float64) @ np.asarray(keys, dtype=np.float64).T  # [g, n]
    valid = page_pos >= 0
    per_tok = scores[:, np.where(valid, page_pos, 0)]  # [g, L, C]
    return np.where(valid[None], per_tok, -np.inf).max(axis=2)


def best_pages(queries: np.ndarray, keys: np.ndarray, page_ids: list[np.ndarray],
               page_pos: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per query head (``i`` on KV head ``i // group``), the page that exact scoring ranks first among its
    KV head's pages ``page_ids[h]`` (token positions ``page_pos[h] [L_h, C]``, -1 padded), and that score.
    Ties go to the page listed first. Returns ``(pages [H_q], scores [H_q])``."""
    H = keys.shape[0]
    g = queries.shape[0] // H
    pages, scores = [], []
    for h in range(H):
        s = page_max_scores(queries[h * g : (h + 1) * g], keys[h], page_pos[h])  # [g, L]
        j = np.argmax(s, axis=1)
        pages.append(np.asarray(page_ids[h])[j])
        scores.append(s[np.arange(g), j])
    return np.concatenate(pages), np.concatenate(scores)


def top_page_hits(best: np.ndarray, selected_pages: list[np.ndarray]) -> np.ndarray:
    """Whether each query head's best page (``best [H_q]``, from :func:`best_pages`) is in the pages selected
    for its KV head (``selected_pages[h]``; ``-1`` entries ignored): ``[H_q]`` bool."""
    best = np.asarray(best)
    g = best.shape[0] // len(selected_pages)
    return np.array([bool(np.isin(best[i], np.asarray(selected_pages[i // g]))) and best[i] >= 0
                     for i in range(best.shape[0])], dtype=bool)


def top_page_recall(best: np.ndarray, selected_pages: list[np.ndarray]) -> float:
    """Share of query heads whose exact best page was selected (mean of :func:`top_page_hits`)."""
    return float(top_page_hits(best, selected_pages).mean())


def row_top_page_hits(best: np.ndarray, row_pages: np.ndarray) -> np.ndarray:
    """Before a GQA merge: whether query head ``i``'s best page is in its own ranked list ``row_pages[i]``."""
    row_pages = np.asarray(row_pages)
    return np.array([bool(np.isin(b, r[r >= 0])) for b, r in zip(np.asarray(best), row_pages)], dtype=bool)


def pages_covering(selected: list[np.ndarray], page_of: np.ndarray) -> list[np.ndarray]:
    """The distinct pages a token selection touches: ``page_of [H_kv, n]`` maps a position to its page
    (``-1`` for positions no page holds, e.g. sink and window), ``selected[h]`` are positions."""
    out = []
    for h, sel in enumerate(selected):
        sel = np.asarray(sel, dtype=np.int64)
        p = page_of[h][sel[(sel >= 0) & (sel < page_of.shape[1])]]
        out.append(np.unique(p[p >= 0]))
    return out


def _best_in(probs: np.ndarray, candidates: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    cand = np.arange(probs.shape[1]) if candidates is None else np.asarray(candidates, dtype=np.int64)
    j = np.argmax(probs[:, cand], axis=1)
    return cand[j], probs[np.arange(probs.shape[0]), cand[j]]


def top_token_hits(probs: np.ndarray, selected: list[np.ndarray], candidates: np.ndarray | None = None) -> np.ndarray:
    """Whether each query head's most attended token among ``candidates`` (default: every position; the
    highest ``q . k``, as softmax is monotone) is in its KV head's selection: ``[H_q]`` bool. With
    ``candidates`` the positions a page layout covers, that token lies in the exact best page of
    :func:`best_pages`, so for a selection of whole pages this equals :func:`top_page_hits` (up to ties)."""
    best, _ = _best_in(probs, candidates)
    return top_page_hits(best, selected)


def top_logit_gap(probs: np.ndarray, selected: list[np.ndarray], candidates: np.ndarray | None = None) -> np.ndarray:
    """Per query head, ``log`` of (best candidate's probability / best selected candidate's): the logit
    ``q . k / sqrt(d)`` the selection gives up at the top. 0 where the best token is selected (or one that
    ties with it), ``inf`` where no candidate is selected. ``exp(-gap)`` is how much weight the best token
    that was kept has, relative to the best token there is: a small gap is a near tie, a large one a miss
    that can change an answer."""
    g = probs.shape[0] // len(selected)
    _, top = _best_in(probs, candidates)
    cand = np.ones(probs.shape[1], dtype=bool) if candidates is None else np.isin(np.arange(probs.shape[1]), candidates)
    out = np.empty(probs.shape[0])
    for i in range(probs.shape[0]):
        sel = np.asarray(selected[i // g], dtype=np.int64)
        sel = sel[cand[sel]] if sel.size else sel
        kept = probs[i, sel].max() if sel.size else 0.0
        out[i] = np.log(top[i]) - np.log(kept) if kept > 0 else np.inf
    return out


def ratio_percentile(values, reference, q: float = 5.0) -> float:
    """``q``-th percentile (numpy's linear interpolation) of ``values / reference`` over the cases where
    ``reference > 0``; NaN if there is none. E.g. the 5th percentile over (step, layer) of IceCache's mass
    recall relative to oracle pages: the bad tail that a mean of 0.98 hides."""
    v = np.asarray(values, dtype=np.float64).ravel()
    r = np.asarray(reference, dtype=np.float64).ravel()
    if v.shape != r.shape:
        raise ValueError(f"values and reference differ in size: {v.shape} vs {r.shape}")
    ok = r > 0
    return float(np.percentile(v[ok] / r[ok], q)) if ok.any() else float("nan")
