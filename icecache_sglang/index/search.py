"""Numba kernels of the decode-time search (index-spec sections 2, 3.3, 5.3).

One query row = one query head searching its KV head's tree. ``search_rows`` runs rows in parallel
(numba threads); the GQA merge of a KV head's rows is ``merge_group_pages``.

Search rules, shared with the NumPy reference (:mod:`icecache_sglang.index.reference`):

* children of a cell are kept sorted by projection; a cell search scores exactly the ``R`` children
  nearest to the query's projection (a contiguous window of the sorted list, left wins ties), where
  ``R = max(num_to_retrieve, ceil(prop * mc), k_req)``, or all children when ``k_req >= mc``;
* on levels >= 1 a cell keeps its best ``max(fov, coverage prefix)`` children, where the coverage
  prefix is the shortest prefix of the score order whose subtree page counts reach ``P`` (the window
  is widened first until the scored children reach that coverage); the union over the frontier is
  cut the same way and becomes the next frontier (cumulative: every kept token is a result too);
* a cell whose children are on level 0 is scored with ``k_req = P`` and contributes the best scored
  token of each of its pages;
* pages are ranked by their best found token (score descending, token id ascending); the top ``P``
  are returned. Scores are float32 ``<q, k>``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

NEG_INF = np.float32(-np.inf)


@njit(cache=True, inline="always")
def _better(sa, ta, sb, tb):
    return sa > sb or (sa == sb and ta < tb)


@njit(cache=True)
def order_by_score(scores, tids, n):
    """Indices of the first ``n`` entries by score descending, ties by token id ascending."""
    o1 = np.argsort(tids[:n], kind="mergesort")
    neg = np.empty(n, np.float32)
    for i in range(n):
        neg[i] = -scores[o1[i]]
    o2 = np.argsort(neg, kind="mergesort")
    return o1[o2]


@njit(cache=True, fastmath=True)
def _dot(page_keys, h, p, j, q):
    k = page_keys[h, p, j]
    s = np.float32(0.0)
    for i in range(q.shape[0]):
        s += k[i] * q[i]
    return s


@njit(cache=True)
def _window(pn, n, qp, r):
    """[lo, hi) of the ``r`` entries of the sorted ``pn[:n]`` nearest to ``qp`` (left wins ties)."""
    a, b = 0, n
    while a < b:
        mid = (a + b) // 2
        if pn[mid] < qp:
            a = mid + 1
        else:
            b = mid
    lo, hi = a, a
    while hi - lo < r:
        gl = qp - pn[lo - 1] if lo > 0 else np.inf
        gr = pn[hi] - qp if hi < n else np.inf
        if gl <= gr:
            lo -= 1
        else:
            hi += 1
    return lo, hi


@njit(cache=True)
def _grow_window(pn, n, qp, lo, hi):
    gl = qp - pn[lo - 1] if lo > 0 else np.inf
    gr = pn[hi] - qp if hi < n else np.inf
    if gl <= gr:
        return lo - 1, hi
    return lo, hi + 1


@njit(cache=True)
def _gather_children(S, h, cell, faithful, buf_t, buf_pn, buf_p, buf_j):
    """The cell's children in order: token ids, scaled projections, (page, slot). Reads pages only."""
    cell_first, cell_m = S[7], S[10]
    page_tok, page_fill, page_next, page_proj = S[13], S[14], S[16], S[24]
    scale = 1.0 if faithful else 1.0 / math.sqrt(max(cell_m[h, cell], 1e-30))
    n = 0
    p = cell_first[h, cell]
    while p >= 0:
        for j in range(page_fill[h, p]):
            buf_t[n] = page_tok[h, p, j]
            buf_pn[n] = page_proj[h, p, j] * scale
            buf_p[n] = p
            buf_j[n] = j
            n += 1
        p = page_next[h, p]
    return n


@njit(cache=True)
def _retrieve_count(mc, k_req, prop, ntr):
    if k_req >= mc:
        return mc
    r = max(ntr, int(math.ceil(prop * mc)), k_req)
    return min(r, mc)


@njit(cache=True)
def _keep_count(cnt_pages, h, tids, order, n, fov, P):
    """How many of the best entries to keep: at least ``fov``, and enough for their subtrees to hold
    ``P`` pages (the coverage rule), never more than ``n``."""
    e = 0
    c = 0
    while e < n and (e < fov or c < P):
        c += cnt_pages[h, tids[order[e]] + 1]
        e += 1
    return e


@njit(cache=True)
def _search_upper_cell(S, h, cell, q, qp, fov, P, prop, ntr, faithful, buf_t, buf_pn, buf_p, buf_j, buf_s,
                       out_t, out_s, n_out):
    """Append the kept children of an upper cell (children on level >= 1) to out_t/out_s."""
    cnt_pages, page_keys = S[12], S[22]
    mc = _gather_children(S, h, cell, faithful, buf_t, buf_pn, buf_p, buf_j)
    if mc == 0:
        return n_out
    lo, hi = _window(buf_pn, mc, qp, _retrieve_count(mc, fov, prop, ntr))
    cov = 0
    for i in range(lo, hi):
        cov += cnt_pages[h, buf_t[i] + 1]
    while cov < P and hi - lo < mc:
        nlo, nhi = _grow_window(buf_pn, mc, qp, lo, hi)
        i = nlo if nlo < lo else hi
        cov += cnt_pages[h, buf_t[i] + 1]
        lo, hi = nlo, nhi
    w = hi - lo
    for i in range(w):
        buf_s[i] = _dot(page_keys, h, buf_p[lo + i], buf_j[lo + i], q)
    order = order_by_score(buf_s, buf_t[lo:hi], w)
    e = _keep_count(cnt_pages, h, buf_t[lo:hi], order, w, fov, P)
    for i in range(e):
        out_t[n_out + i] = buf_t[lo + order[i]]
        out_s[n_out + i] = buf_s[order[i]]
    return n_out + e


@njit(cache=True)
def _offer_page(p, t, s, pbest, ptid, touched, n_touched):
    if ptid[p] < 0:
        touched[n_touched] = p
        n_touched += 1
    if ptid[p] < 0 or _better(s, t, pbest[p], ptid[p]):
        pbest[p] = s
        ptid[p] = t
    return n_touched


@njit(cache=True)
def _search_leaf_cell(S, h, cell, q, qp, P, prop, ntr, faithful, buf_t, buf_pn, buf_p, buf_j,
                      pbest, ptid, touched, n_touched):
    """Score the window of a cell whose children are on level 0; offer each scored child's page."""
    page_keys = S[22]
    mc = _gather_children(S, h, cell, faithful, buf_t, buf_pn, buf_p, buf_j)
    if mc == 0:
        return n_touched
    lo, hi = _window(buf_pn, mc, qp, _retrieve_count(mc, P, prop, ntr))
    for i in range(lo, hi):
        s = _dot(page_keys, h, buf_p[i], buf_j[i], q)
        n_touched = _offer_page(buf_p[i], buf_t[i], s, pbest, ptid, touched, n_touched)
    return n_touched


@njit(cache=True)
def search_one(S, h, q, qp, top_level, P, fov, prop, ntr, faithful, n_tok_cap, out_pages, out_scores):
    """The cumulative descent for one query row; writes the top-P pages (best first, -1 padded)."""
    n_pages_cap = S[14].shape[1]
    buf_t = np.empty(n_tok_cap, np.int32)
    buf_pn = np.empty(n_tok_cap, np.float64)
    buf_s = np.empty(n_tok_cap, np.float32)
    buf_p = np.empty(n_tok_cap, np.int32)
    buf_j = np.empty(n_tok_cap, np.int32)
    tok_page = S[2]
    fr_t = np.empty(n_tok_cap, np.int32)
    fr_s = np.empty(n_tok_cap, np.float32)
    nx_t = np.empty(n_tok_cap, np.int32)
    nx_s = np.empty(n_tok_cap, np.float32)
    pbest = np.full(n_pages_cap, NEG_INF, np.float32)
    ptid = np.full(n_pages_cap, -1, np.int32)
    touched = np.empty(n_pages_cap, np.int32)
    n_touched = 0
    for i in range(out_pages.shape[0]):
        out_pages[i] = -1
        out_scores[i] = NEG_INF
    if top_level < 0:
        return
    if top_level == 0:
        n_touched = _search_leaf_cell(S, h, 0, q, qp, P, prop, ntr, faithful, buf_t, buf_pn, buf_p, buf_j, pbest, ptid, touched, n_touched)
    else:
        n_fr = _search_upper_cell(S, h, 0, q, qp, fov, P, prop, ntr, faithful, buf_t, buf_pn, buf_p, buf_j, buf_s,
                                  fr_t, fr_s, 0)
        for i in range(n_fr):
            n_touched = _offer_page(tok_page[h, fr_t[i]], fr_t[i], fr_s[i], pbest, ptid, touched, n_touched)
        level = top_level
        while level >= 2:
            n_nx = 0
            for i in range(n_fr):
                n_nx = _search_upper_cell(S, h, fr_t[i] + 1, q, qp, fov, P, prop, ntr, faithful,
                                          buf_t, buf_pn, buf_p, buf_j, buf_s, nx_t, nx_s, n_nx)
            order = order_by_score(nx_s, nx_t, n_nx)
            n_fr = _keep_count(S[12], h, nx_t, order, n_nx, fov, P)
            for i in range(n_fr):
                fr_t[i] = nx_t[order[i]]
                fr_s[i] = nx_s[order[i]]
            for i in range(n_fr):
                n_touched = _offer_page(tok_page[h, fr_t[i]], fr_t[i], fr_s[i], pbest, ptid, touched, n_touched)
            level -= 1
        for i in range(n_fr):
            n_touched = _search_leaf_cell(S, h, fr_t[i] + 1, q, qp, P, prop, ntr, faithful,
                                          buf_t, buf_pn, buf_p, buf_j, pbest, ptid, touched, n_touched)
    ps = np.empty(n_touched, np.float32)
    pt = np.empty(n_touched, np.int32)
    for i in range(n_touched):
        ps[i] = pbest[touched[i]]
        pt[i] = ptid[touched[i]]
    order = order_by_score(ps, pt, n_touched)
    for i in range(min(P, n_touched)):
        out_pages[i] = touched[order[i]]
        out_scores[i] = ps[order[i]]


@njit(cache=True, parallel=True)
def search_rows(S, Q, qp, row_head, top_level, P, fov, prop, ntr, faithful, n_tok_cap, out_pages, out_scores):
    for r in prange(Q.shape[0]):
        h = row_head[r]
        search_one(S, h, Q[r], qp[r], top_level[h], P, fov, prop, ntr, faithful, n_tok_cap,
                   out_pages[r], out_scores[r])


@njit(cache=True)
def merge_group_pages(row_pages, group, P):
    """GQA merge: per KV head, interleave its ``group`` rows rank-major and keep the first P unique."""
    n_kv = row_pages.shape[0] // group
    out = np.full((n_kv, P), -1, np.int32)
    for h in range(n_kv):
        n = 0
        for rank in range(row_pages.shape[1]):
            for g in range(group):
                p = row_pages[h * group + g, rank]
                if p < 0:
                    continue
                seen = False
                for i in range(n):
                    if out[h, i] == p:
                        seen = True
                        break
                if not seen:
                    out[h, n] = p
                    n += 1
                    if n == P:
                        break
            if n == P:
                break
    return out
