"""Numba kernels of the decode-time search (index-spec sections 2, 3.3, 5.3).

One query row = one query head searching its KV head's tree. ``search_batch`` runs the rows of B indexes,
every (index, KV head) pair in parallel (numba threads; one index is a batch of one); the GQA merge of a KV
head's rows is ``merge_group_pages``.

Search rules, shared with the NumPy reference (:mod:`icecache_sglang.index.reference`):

* a cell's children are read in projection order (the order of their pages under the projection layout,
  sorted on the way in under the bisect layout); a cell search scores exactly the ``R`` children
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

from .keys import key_dot
from .pagetable import cell_slot

NEG_INF = np.float32(-np.inf)


@njit(cache=True, nogil=True, inline="always")
def _better(sa, ta, sb, tb):
    return sa > sb or (sa == sb and ta < tb)


@njit(cache=True, nogil=True)
def order_by_score(scores, tids, n):
    """Indices of the first ``n`` entries by score descending, ties by token id ascending."""
    o1 = np.argsort(tids[:n], kind="mergesort")
    neg = np.empty(n, np.float32)
    for i in range(n):
        neg[i] = -scores[o1[i]]
    o2 = np.argsort(neg, kind="mergesort")
    return o1[o2]


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def _grow_window(pn, n, qp, lo, hi):
    gl = qp - pn[lo - 1] if lo > 0 else np.inf
    gr = pn[hi] - qp if hi < n else np.inf
    if gl <= gr:
        return lo - 1, hi
    return lo, hi + 1


@njit(cache=True, nogil=True)
def _gather_children(S, h, cell, faithful, buf_t, buf_pn, buf_p, buf_j):
    """The cell's children in page order: token ids, scaled projections, (page, slot). Reads pages only.
    Under the bisect layout that is not projection order: a caller whose window is narrower than the cell
    calls ``_projection_order`` first (a window over the whole cell needs no order)."""
    cell_first, cell_m = S[6], S[9]
    page_tok, page_fill, page_next, page_proj = S[12], S[13], S[15], S[23]
    cs = cell_slot(S, h, cell)  # a frontier cell is the root or a token above level 0: it has a slot
    scale = 1.0 if faithful else 1.0 / math.sqrt(max(cell_m[h, cs], 1e-30))
    n = 0
    p = cell_first[h, cs]
    while p >= 0:
        for j in range(page_fill[h, p]):
            buf_t[n] = page_tok[h, p, j]
            buf_pn[n] = page_proj[h, p, j] * scale
            buf_p[n] = p
            buf_j[n] = j
            n += 1
        p = page_next[h, p]
    return n


@njit(cache=True, nogil=True)
def _projection_order(buf_t, buf_pn, buf_p, buf_j, n):
    """Sort gathered children by (projection, token id) unless they already are."""
    for i in range(1, n):
        if not _proj_le(buf_pn[i - 1], buf_t[i - 1], buf_pn[i], buf_t[i]):
            _sort_by_projection(buf_t, buf_pn, buf_p, buf_j, n)
            return


@njit(cache=True, nogil=True, inline="always")
def _proj_le(pa, ta, pb, tb):
    return pa < pb or (pa == pb and ta <= tb)


@njit(cache=True, nogil=True)
def _sort_by_projection(buf_t, buf_pn, buf_p, buf_j, n):
    o1 = np.argsort(buf_t[:n], kind="mergesort")
    o2 = np.argsort(buf_pn[:n][o1], kind="mergesort")
    order = o1[o2]
    t, pn, p, j = buf_t[:n].copy(), buf_pn[:n].copy(), buf_p[:n].copy(), buf_j[:n].copy()
    for i in range(n):
        buf_t[i], buf_pn[i], buf_p[i], buf_j[i] = t[order[i]], pn[order[i]], p[order[i]], j[order[i]]


@njit(cache=True, nogil=True)
def _retrieve_count(mc, k_req, prop, ntr):
    if k_req >= mc:
        return mc
    r = max(ntr, int(math.ceil(prop * mc)), k_req)
    return min(r, mc)


@njit(cache=True, nogil=True)
def _keep_count(cnt_pages, tok_cell, h, tids, order, n, fov, P):
    """How many of the best entries to keep: at least ``fov``, and enough for their subtrees to hold
    ``P`` pages (the coverage rule), never more than ``n``. (The entries are above level 0: each has a cell
    slot in ``tok_cell``.)"""
    e = 0
    c = 0
    while e < n and (e < fov or c < P):
        c += cnt_pages[h, tok_cell[h, tids[order[e]] + 1]]
        e += 1
    return e


@njit(cache=True, nogil=True)
def _offer_page(p, t, s, pbest, ptid, touched, n_touched):
    if ptid[p] < 0:
        touched[n_touched] = p
        n_touched += 1
    if ptid[p] < 0 or _better(s, t, pbest[p], ptid[p]):
        pbest[p] = s
        ptid[p] = t
    return n_touched


@njit(cache=True, nogil=True)
def _score_windows(S, h, Q, active, lo, hi, buf_p, buf_j, sc):
    """Scores of every active row over its own window; each key row is read once for all rows."""
    page_keys = S[21]
    first, last = 1 << 62, -1
    for r in range(Q.shape[0]):
        if active[r]:
            first = min(first, lo[r])
            last = max(last, hi[r])
    for i in range(first, last):
        k = page_keys[h, buf_p[i], buf_j[i]]
        for r in range(Q.shape[0]):
            if active[r] and lo[r] <= i < hi[r]:
                sc[r, i] = key_dot(k, Q[r])


@njit(cache=True, nogil=True)
def _search_upper_cell(S, h, cell, Q, qp, active, fov, P, prop, ntr, faithful, buf_t, buf_pn, buf_p, buf_j,
                       sc, lo, hi, out_t, out_s, n_out):
    """For each active row, append the kept children of an upper cell (children on level >= 1)."""
    cnt_pages, tok_cell = S[11], S[26]  # an upper cell's children are above level 0: each has a slot
    mc = _gather_children(S, h, cell, faithful, buf_t, buf_pn, buf_p, buf_j)
    if mc == 0:
        return
    if _retrieve_count(mc, fov, prop, ntr) < mc:
        _projection_order(buf_t, buf_pn, buf_p, buf_j, mc)
    for r in range(Q.shape[0]):
        if not active[r]:
            continue
        a, b = _window(buf_pn, mc, qp[r], _retrieve_count(mc, fov, prop, ntr))
        cov = 0
        for i in range(a, b):
            cov += cnt_pages[h, tok_cell[h, buf_t[i] + 1]]
        while cov < P and b - a < mc:
            na, nb = _grow_window(buf_pn, mc, qp[r], a, b)
            cov += cnt_pages[h, tok_cell[h, buf_t[na if na < a else b] + 1]]
            a, b = na, nb
        lo[r], hi[r] = a, b
    _score_windows(S, h, Q, active, lo, hi, buf_p, buf_j, sc)
    for r in range(Q.shape[0]):
        if not active[r]:
            continue
        a, w = lo[r], hi[r] - lo[r]
        order = order_by_score(sc[r, a : a + w], buf_t[a : a + w], w)
        e = _keep_count(cnt_pages, tok_cell, h, buf_t[a : a + w], order, w, fov, P)
        for i in range(e):
            out_t[r, n_out[r] + i] = buf_t[a + order[i]]
            out_s[r, n_out[r] + i] = sc[r, a + order[i]]
        n_out[r] += e


@njit(cache=True, nogil=True)
def _search_leaf_cell(S, h, cell, Q, qp, active, P, prop, ntr, faithful, buf_t, buf_pn, buf_p, buf_j,
                      sc, lo, hi, pbest, ptid, touched, n_touched):
    """For each active row, score its window of a cell whose children are on level 0 and offer pages."""
    mc = _gather_children(S, h, cell, faithful, buf_t, buf_pn, buf_p, buf_j)
    if mc == 0:
        return
    if _retrieve_count(mc, P, prop, ntr) < mc:
        _projection_order(buf_t, buf_pn, buf_p, buf_j, mc)
    for r in range(Q.shape[0]):
        if active[r]:
            lo[r], hi[r] = _window(buf_pn, mc, qp[r], _retrieve_count(mc, P, prop, ntr))
    _score_windows(S, h, Q, active, lo, hi, buf_p, buf_j, sc)
    for r in range(Q.shape[0]):
        if active[r]:
            for i in range(lo[r], hi[r]):
                n_touched[r] = _offer_page(buf_p[i], buf_t[i], sc[r, i], pbest[r], ptid[r], touched[r], n_touched[r])


@njit(cache=True, nogil=True)
def _cells_by_row(fr_t, n_fr):
    """(cell, row) pairs of every row's frontier, sorted by cell, so each cell is gathered once."""
    total = 0
    for r in range(n_fr.shape[0]):
        total += n_fr[r]
    cells = np.empty(total, np.int64)
    rows = np.empty(total, np.int64)
    k = 0
    for r in range(n_fr.shape[0]):
        for i in range(n_fr[r]):
            cells[k] = fr_t[r, i] + 1
            rows[k] = r
            k += 1
    order = np.argsort(cells, kind="mergesort")
    return cells[order], rows[order]


@njit(cache=True, nogil=True)
def _mark_rows_of_cell(cells, rows, i, active):
    """Mark active the rows whose frontier holds ``cells[i]``; return the end of that run of pairs."""
    active[:] = False
    j = i
    while j < cells.shape[0] and cells[j] == cells[i]:
        active[rows[j]] = True
        j += 1
    return j


@njit(cache=True, nogil=True)
def search_group(S, h, Q, qp, top_level, P, fov, prop, ntr, faithful, n_tok_cap, out_pages, out_scores):
    """The cumulative descent for the query rows ``Q [g, d]`` of one KV head ``h``.

    Every row follows its own path (identical to searching alone); rows that reach the same cell share
    its gather and each key row's memory read. Writes each row's top-P pages (best first, -1 padded).
    """
    g = Q.shape[0]
    n_pages_cap = S[13].shape[1]
    tok_page, cnt_pages, tok_cell = S[2], S[11], S[26]
    buf_t = np.empty(n_tok_cap, np.int32)
    buf_pn = np.empty(n_tok_cap, np.float64)
    buf_p = np.empty(n_tok_cap, np.int32)
    buf_j = np.empty(n_tok_cap, np.int32)
    sc = np.empty((g, n_tok_cap), np.float32)
    lo = np.zeros(g, np.int64)
    hi = np.zeros(g, np.int64)
    active = np.ones(g, np.bool_)
    fr_t = np.empty((g, n_tok_cap), np.int32)
    fr_s = np.empty((g, n_tok_cap), np.float32)
    nx_t = np.empty((g, n_tok_cap), np.int32)
    nx_s = np.empty((g, n_tok_cap), np.float32)
    n_fr = np.zeros(g, np.int64)
    n_nx = np.zeros(g, np.int64)
    pbest = np.full((g, n_pages_cap), NEG_INF, np.float32)
    ptid = np.full((g, n_pages_cap), -1, np.int32)
    touched = np.empty((g, n_pages_cap), np.int32)
    n_touched = np.zeros(g, np.int64)
    out_pages[:] = -1
    out_scores[:] = NEG_INF
    if top_level < 0:
        return
    if top_level == 0:
        _search_leaf_cell(S, h, np.int64(0), Q, qp, active, P, prop, ntr, faithful, buf_t, buf_pn, buf_p, buf_j,
                          sc, lo, hi, pbest, ptid, touched, n_touched)
    else:
        _search_upper_cell(S, h, np.int64(0), Q, qp, active, fov, P, prop, ntr, faithful, buf_t, buf_pn, buf_p, buf_j,
                           sc, lo, hi, fr_t, fr_s, n_fr)
        level = top_level
        while True:
            for r in range(g):
                for i in range(n_fr[r]):
                    t = fr_t[r, i]
                    n_touched[r] = _offer_page(tok_page[h, t], t, fr_s[r, i], pbest[r], ptid[r], touched[r], n_touched[r])
            if level < 2:
                break
            cells, rows = _cells_by_row(fr_t, n_fr)
            n_nx[:] = 0
            i = 0
            while i < cells.shape[0]:
                j = _mark_rows_of_cell(cells, rows, np.int64(i), active)
                _search_upper_cell(S, h, cells[i], Q, qp, active, fov, P, prop, ntr, faithful, buf_t, buf_pn,
                                   buf_p, buf_j, sc, lo, hi, nx_t, nx_s, n_nx)
                i = j
            for r in range(g):
                order = order_by_score(nx_s[r], nx_t[r], n_nx[r])
                n_fr[r] = _keep_count(cnt_pages, tok_cell, h, nx_t[r], order, n_nx[r], fov, P)
                for k in range(n_fr[r]):
                    fr_t[r, k] = nx_t[r, order[k]]
                    fr_s[r, k] = nx_s[r, order[k]]
            level -= 1
        cells, rows = _cells_by_row(fr_t, n_fr)
        i = 0
        while i < cells.shape[0]:
            j = _mark_rows_of_cell(cells, rows, np.int64(i), active)
            _search_leaf_cell(S, h, cells[i], Q, qp, active, P, prop, ntr, faithful, buf_t, buf_pn, buf_p, buf_j,
                              sc, lo, hi, pbest, ptid, touched, n_touched)
            i = j
    for r in range(g):
        n = n_touched[r]
        ps = np.empty(n, np.float32)
        pt = np.empty(n, np.int32)
        for i in range(n):
            ps[i] = pbest[r, touched[r, i]]
            pt[i] = ptid[r, touched[r, i]]
        order = order_by_score(ps, pt, n)
        for i in range(min(P, n)):
            out_pages[r, i] = touched[r, order[i]]
            out_scores[r, i] = ps[order[i]]


@njit(cache=True, nogil=True)
def _search_head(S, h, Q, qp, row_head, top_level, P, fov, prop, ntr, faithful, n_tok_cap, out_pages, out_scores):
    """The rows of ``Q`` that belong to KV head ``h``, searched together in its tree."""
    rows = np.flatnonzero(row_head == h)
    if rows.shape[0] == 0:
        return
    Qg = np.empty((rows.shape[0], Q.shape[1]), np.float32)
    qpg = np.empty(rows.shape[0], np.float64)
    for i in range(rows.shape[0]):
        Qg[i] = Q[rows[i]]
        qpg[i] = qp[rows[i]]
    op = np.empty((rows.shape[0], out_pages.shape[1]), np.int32)
    osc = np.empty((rows.shape[0], out_pages.shape[1]), np.float32)
    search_group(S, h, Qg, qpg, top_level, P, fov, prop, ntr, faithful, n_tok_cap, op, osc)
    for i in range(rows.shape[0]):
        out_pages[rows[i]] = op[i]
        out_scores[rows[i]] = osc[i]


@njit(cache=True, nogil=True, parallel=True)
def search_batch(states, which, Q, qp, row_head, top_level, P, fov, prop, ntr, faithful, n_tok_cap, out_pages,
                 out_scores):
    """Search every query row in its KV head's tree, for B indexes at once (index b's state tuple is
    ``states[which[b]]``; row ``r`` searches KV head ``row_head[r]``): ``Q [B, R, d]``,
    ``qp [B, R]``, ``top_level [B, H]``, ``fov`` and ``n_tok_cap`` ``[B]``, ``out_* [B, R, P]``. Every
    (index, KV head) pair is one parallel work item, so a batch fills the cores even with one KV head."""
    H = top_level.shape[1]
    for it in prange(Q.shape[0] * H):
        item = np.int64(it)
        b = item // H
        h = item - b * H
        _search_head(states[which[b]], h, Q[b], qp[b], row_head, top_level[b, h], P, fov[b], prop, ntr, faithful,
                     n_tok_cap[b], out_pages[b], out_scores[b])


@njit(cache=True, nogil=True)
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
