"""Numba page-table operations for one KV head of a :class:`PagedDCIIndex` (index-spec section 5.2).

A *cell* is the ordered child set of a token (cell ``t + 1``) or of the root (cell ``0``). Its children
are kept sorted by ``(page key, token id)`` and laid out as a linked list of pages of at most ``C``
slots; a page never mixes cells. The page key (``tok_pkey``) is the projection under the ``projection``
layout and a rank in the cell's bisection order under ``bisect`` (``layout.py``). Physical key/value rows live in ``page_keys[h, page, slot]`` so that
scoring a cell reads contiguous memory and a selected page can be copied as one block.

Every function takes the state tuple ``S`` (see :data:`STATE_FIELDS`) and a head ``h``. They are
sequential per head; callers parallelise over heads.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .keys import key_dim, key_dot, key_row

#: The tree's real numbers (projections, page keys, squared norms and max-norms): float32, computed in float64
#: from float32 inputs and rounded once when stored. At SmolLM2's head_dim 64 six float64 arrays per token
#: weighed as much as the index's int8 key copy (``benchmarks/int8_keys.py``).
TREE_FLOAT = np.float32

# The order of the arrays in the state tuple passed to every kernel.
STATE_FIELDS = (
    "tok_level",  # int8 [H, T]   -1 = not in the tree (levels stay below config.MAX_LEVELS, 64)
    "tok_parent",  # int32 [H, T]   parent token id, -1 = root, -2 = not in the tree
    "tok_page",  # int32 [H, T]
    "tok_slot",  # int32 [H, T]
    "tok_proj",  # float32 [H, T] raw projection w.k + a*sqrt(m - |k|^2) with m its cell's cell_m
    "tok_sqn",  # float32 [H, T] |k|^2
    # a cell's numbers, at its slot (``tok_cell``): only the root and tokens above level 0 have one
    "cell_first",  # int32 [H, NS] first page of the cell, -1 when empty
    "cell_last",  # int32 [H, NS]
    "cell_nchild",  # int32 [H, NS]
    "cell_m",  # float32 [H, NS] the m shared by all children of the cell
    "cnt_desc",  # int32 [H, NS] tokens in the subtree (a token counts itself; the root does not)
    "cnt_pages",  # int32 [H, NS] pages of the cell and of every cell below it
    "page_tok",  # int32 [H, P, C]
    "page_fill",  # int32 [H, P]
    "page_cell",  # int32 [H, P]    -1 = free
    "page_next",  # int32 [H, P]
    "page_prev",  # int32 [H, P]
    "page_version",  # uint32 [H, P] bumped by every change of the page's tokens or order (``dirty_pages``)
    "free_stack",  # int32 [H, P]   LIFO of released page ids
    "free_n",  # int32 [H]
    "next_page",  # int32 [H]      the next never-used page id
    "page_keys",  # [H, P, C, d] float32 or uint16 bfloat16 bits, or [H, P, C, d + 4] int8 rows (index/keys.py)
    "page_vals",  # float32 [H, P, C, dv] (dv may be 0)
    "page_proj",  # float32 [H, P, C]    tok_proj of the token in each slot (contiguous for the search)
    "tok_pkey",  # float32 [H, T] page key: the cell order (layout.py); tok_proj under the projection layout
    "key_scale",  # float32 [H, d] the stored rows are keys / key_scale (int8: channel scales; else 1)
    "tok_cell",  # int32 [H, T+1] the slot of cell ``t + 1`` (token t's children) in the cell arrays; the root's
    # (cell 0) is slot 0; -1: a token on level 0, which has no children (a subtree of itself, no pages)
)


@njit(cache=True, nogil=True, inline="always")
def cell_slot(S, h, cell):
    """The slot of ``cell`` (token id + 1; 0: the root) in the cell arrays; -1 for a level-0 token's.

    A cell is named by its token (``tok_parent + 1``, ``page_cell``), but its numbers are kept only for the
    root and the tokens above level 0 (about p0 of the tokens): per-token cell arrays weighed 24 bytes per
    token and KV head, a sixth of the index at SmolLM2's shape (``benchmarks/int8_keys.py``)."""
    return S[26][h, cell]


@njit(cache=True, nogil=True, inline="always")
def subtree_tokens(S, h, cell):
    """Tokens in the subtree of ``cell``'s token (1 for a level-0 token)."""
    s = cell_slot(S, h, cell)
    return np.int64(S[10][h, s]) if s >= 0 else np.int64(1)


@njit(cache=True, nogil=True, inline="always")
def subtree_pages(S, h, cell):
    """Pages of ``cell`` and of every cell below it (0 for a level-0 token)."""
    s = cell_slot(S, h, cell)
    return np.int64(S[11][h, s]) if s >= 0 else np.int64(0)


@njit(cache=True, nogil=True, inline="always")
def key_less(pa, ta, pb, tb):
    """Cell order: by page key, ties by token id."""
    return pa < pb or (pa == pb and ta < tb)


@njit(cache=True, nogil=True, inline="always")
def bump_chain(S, h, cell, d_desc, d_pages):
    """Add to the subtree counters of ``cell`` and of every ancestor up to the root."""
    tok_parent = S[1]
    cnt_desc = S[10]
    cnt_pages = S[11]
    c = cell
    while True:
        s = cell_slot(S, h, c)  # every ancestor has children, so a slot
        cnt_desc[h, s] += d_desc
        cnt_pages[h, s] += d_pages
        if c == 0:
            break
        c = tok_parent[h, c - 1] + 1


@njit(cache=True, nogil=True, inline="always")
def page_alloc(S, h, cell):
    page_fill, page_cell, page_next, page_prev, page_version = S[13], S[14], S[15], S[16], S[17]
    free_stack, free_n, next_page = S[18], S[19], S[20]
    if free_n[h] > 0:
        free_n[h] -= 1
        p = free_stack[h, free_n[h]]
    else:
        p = next_page[h]
        next_page[h] += 1
    page_fill[h, p] = 0
    page_cell[h, p] = cell
    page_next[h, p] = -1
    page_prev[h, p] = -1
    page_version[h, p] += 1
    return p


@njit(cache=True, nogil=True)
def page_release(S, h, p):
    page_fill, page_cell, page_version, free_stack, free_n = S[13], S[14], S[17], S[18], S[19]
    page_fill[h, p] = 0
    page_cell[h, p] = -1
    page_version[h, p] += 1
    free_stack[h, free_n[h]] = p
    free_n[h] += 1


@njit(cache=True, nogil=True, inline="always")
def link_after(S, h, cell, after, p):
    """Link page ``p`` into ``cell``'s list after page ``after`` (-1: at the front)."""
    cell_first, cell_last, page_next, page_prev = S[6], S[7], S[15], S[16]
    s = cell_slot(S, h, cell)
    if after < 0:
        nxt = cell_first[h, s]
        cell_first[h, s] = p
    else:
        nxt = page_next[h, after]
        page_next[h, after] = p
    page_prev[h, p] = after
    page_next[h, p] = nxt
    if nxt < 0:
        cell_last[h, s] = p
    else:
        page_prev[h, nxt] = p


@njit(cache=True, nogil=True)
def unlink(S, h, p):
    cell_first, cell_last, page_cell, page_next, page_prev = S[6], S[7], S[14], S[15], S[16]
    s = cell_slot(S, h, page_cell[h, p])
    a, b = page_prev[h, p], page_next[h, p]
    if a < 0:
        cell_first[h, s] = b
    else:
        page_next[h, a] = b
    if b < 0:
        cell_last[h, s] = a
    else:
        page_prev[h, b] = a


@njit(cache=True, nogil=True, inline="always")
def move_slot(S, h, src_p, src_j, dst_p, dst_j):
    """Copy the token in (src_p, src_j) with its key/value rows to (dst_p, dst_j)."""
    tok_page, tok_slot, page_tok, page_keys, page_vals, page_proj = S[2], S[3], S[12], S[21], S[22], S[23]
    t = page_tok[h, src_p, src_j]
    page_tok[h, dst_p, dst_j] = t
    page_proj[h, dst_p, dst_j] = page_proj[h, src_p, src_j]
    page_keys[h, dst_p, dst_j, :] = page_keys[h, src_p, src_j, :]
    if page_vals.shape[3] > 0:
        page_vals[h, dst_p, dst_j, :] = page_vals[h, src_p, src_j, :]
    tok_page[h, t] = dst_p
    tok_slot[h, t] = dst_j


@njit(cache=True, nogil=True)
def page_insert(S, h, t, cell, key, val):
    """Insert token ``t`` (its ``tok_pkey`` set) into ``cell``'s pages.

    The page is the first whose last key is >= the new key (else the last page). A full page first passes
    its last (first) token to the next (previous) page of the cell when that one has room, else splits in
    half, the new id taken from the free list; the pages changed become dirty. (The spec only splits: a
    decode's inserts then halved the fill of the bisect layout's nearly full pages, ``benchmarks/int8_keys.py``.)
    """
    tok_page, tok_slot, tok_pkey = S[2], S[3], S[24]
    cell_first, cell_nchild = S[6], S[8]
    page_tok, page_fill, page_next, page_version = S[12], S[13], S[15], S[17]
    page_keys, page_vals = S[21], S[22]
    C = page_tok.shape[2]
    pt = tok_pkey[h, t]
    cs = cell_slot(S, h, cell)
    p = cell_first[h, cs]
    if p < 0:
        p = page_alloc(S, h, cell)
        link_after(S, h, cell, -1, p)
        bump_chain(S, h, cell, 0, 1)
        pos = 0
    else:
        while True:
            last = page_tok[h, p, page_fill[h, p] - 1]
            if not key_less(tok_pkey[h, last], last, pt, t):
                break
            nx = page_next[h, p]
            if nx < 0:
                break
            p = nx
        f = page_fill[h, p]
        pos = f
        for j in range(f):
            tj = page_tok[h, p, j]
            if key_less(pt, t, tok_pkey[h, tj], tj):
                pos = j
                break
        nxt, prv = page_next[h, p], S[16][h, p]
        if f == C and nxt >= 0 and page_fill[h, nxt] < C:  # room in the next page: shift one token over
            if pos == C:  # the new token is the largest of p: it starts the next page
                p, pos = nxt, 0
            else:
                fq = page_fill[h, nxt]
                for j in range(fq, 0, -1):
                    move_slot(S, h, nxt, j - 1, nxt, j)
                move_slot(S, h, p, C - 1, nxt, 0)
                page_fill[h, nxt] = fq + 1
                page_fill[h, p] = C - 1
                page_version[h, nxt] += 1
        elif f == C and prv >= 0 and page_fill[h, prv] < C:  # room in the previous page
            if pos == 0:  # the new token is the smallest of p: it ends the previous page
                p, pos = prv, page_fill[h, prv]
            else:
                move_slot(S, h, p, 0, prv, page_fill[h, prv])
                page_fill[h, prv] += 1
                for j in range(1, C):
                    move_slot(S, h, p, j, p, j - 1)
                page_fill[h, p] = C - 1
                page_version[h, prv] += 1
                pos -= 1
        elif f == C:
            half = C // 2
            q = page_alloc(S, h, cell)
            link_after(S, h, cell, p, q)
            for j in range(half, C):
                move_slot(S, h, p, j, q, j - half)
            page_fill[h, p] = half
            page_fill[h, q] = C - half
            page_version[h, p] += 1
            bump_chain(S, h, cell, 0, 1)
            if pos > half:
                p = q
                pos -= half
    f = page_fill[h, p]
    for j in range(f, pos, -1):
        move_slot(S, h, p, j - 1, p, j)
    page_tok[h, p, pos] = t
    S[23][h, p, pos] = S[4][h, t]
    page_keys[h, p, pos, :] = key
    if page_vals.shape[3] > 0:
        page_vals[h, p, pos, :] = val
    tok_page[h, t] = p
    tok_slot[h, t] = pos
    page_fill[h, p] = f + 1
    page_version[h, p] += 1
    cell_nchild[h, cs] += 1


@njit(cache=True, nogil=True)
def page_remove(S, h, t):
    """Remove token ``t`` from its page; an emptied page is freed, a page under C/2 borrows or merges."""
    tok_page, tok_slot = S[2], S[3]
    cell_nchild = S[8]
    page_tok, page_fill, page_cell, page_next, page_prev, page_version = S[12], S[13], S[14], S[15], S[16], S[17]
    C = page_tok.shape[2]
    p = tok_page[h, t]
    j0 = tok_slot[h, t]
    cell = page_cell[h, p]
    f = page_fill[h, p]
    for j in range(j0, f - 1):
        move_slot(S, h, p, j + 1, p, j)
    f -= 1
    page_fill[h, p] = f
    page_version[h, p] += 1
    tok_page[h, t] = -1
    tok_slot[h, t] = -1
    cell_nchild[h, cell_slot(S, h, cell)] -= 1
    if f == 0:
        unlink(S, h, p)
        page_release(S, h, p)
        bump_chain(S, h, cell, 0, -1)
        return
    if f >= C // 2:
        return
    nb = page_next[h, p]
    if nb >= 0:
        left, right = p, nb
    else:
        nb = page_prev[h, p]
        if nb < 0:
            return
        left, right = nb, p
    fl, fr = page_fill[h, left], page_fill[h, right]
    page_version[h, left] += 1
    page_version[h, right] += 1
    if fl + fr <= C:  # merge right into left
        for j in range(fr):
            move_slot(S, h, right, j, left, fl + j)
        page_fill[h, left] = fl + fr
        unlink(S, h, right)
        page_release(S, h, right)
        bump_chain(S, h, cell, 0, -1)
    elif right == nb:  # borrow the first token of the next page
        move_slot(S, h, right, 0, left, fl)
        for j in range(fr - 1):
            move_slot(S, h, right, j + 1, right, j)
        page_fill[h, left] = fl + 1
        page_fill[h, right] = fr - 1
    else:  # borrow the last token of the previous page
        for j in range(fr, 0, -1):
            move_slot(S, h, right, j - 1, right, j)
        move_slot(S, h, left, fl - 1, right, 0)
        page_fill[h, left] = fl - 1
        page_fill[h, right] = fr + 1


@njit(cache=True, nogil=True)
def layout_sorted(S, h, cell, tids, keys, vals):
    """Bulk layout of a cell's children (sorted) into fresh pages of balanced fill (sizes differ <= 1)."""
    tok_page, tok_slot = S[2], S[3]
    cell_nchild = S[8]
    page_tok, page_fill, page_keys, page_vals = S[12], S[13], S[21], S[22]
    C = page_tok.shape[2]
    m = tids.shape[0]
    if m == 0:
        return 0
    npg = (m + C - 1) // C
    i = 0
    prev = -1
    for g in range(npg):
        take = (m - i) // (npg - g)
        p = page_alloc(S, h, cell)
        link_after(S, h, cell, prev, p)
        prev = p
        for j in range(take):
            t = tids[i + j]
            page_tok[h, p, j] = t
            S[23][h, p, j] = S[4][h, t]
            page_keys[h, p, j, :] = keys[i + j]
            if page_vals.shape[3] > 0:
                page_vals[h, p, j, :] = vals[i + j]
            tok_page[h, t] = p
            tok_slot[h, t] = j
        page_fill[h, p] = take
        i += take
    cell_nchild[h, cell_slot(S, h, cell)] = m
    return npg


@njit(cache=True, nogil=True)
def lifted_projection(key, c, u0, m, s, scratch):
    """The raw projection ``w.k + a*sqrt(m - |k|^2)`` (``u0 = [w ; a]``, the index's first direction) of the
    stored key row ``key`` (the key as kept: the row's values times the channel scales ``c``), ``s = |k|^2``,
    in float64, for the caller to round once when it stores it. A lift recomputes the projection rather than
    adding the change to the stored float32 value: those roundings added up over a cell's repeated lifts (M
    growing in small steps) and left projections 2e-6 sqrt(M) off after 3000 lifts (a helper's review)."""
    d = key_dim(key)
    row = key_row(key, d, scratch)
    acc = 0.0
    for j in range(d):
        acc += np.float64(row[j] * c[j]) * u0[j]
    return acc + u0[d] * math.sqrt(max(np.float64(m) - np.float64(s), 0.0))


@njit(cache=True, nogil=True)
def relift_cell(S, h, cell, new_m, u0, bisect):
    """Raise the m of ``cell``'s children to ``new_m`` and rebuild its pages (all dirty, ids recycled); ``u0``:
    the index's first projection direction. The projection layout's page keys move with the projections (the
    cell is sorted again)."""
    tok_proj, tok_sqn, tok_pkey = S[4], S[5], S[24]
    cell_first, cell_nchild, cell_m = S[6], S[8], S[9]
    page_tok, page_fill, page_next, page_keys, page_vals = S[12], S[13], S[15], S[21], S[22]
    cs = cell_slot(S, h, cell)
    m = cell_nchild[h, cs]
    d = page_keys.shape[3]
    dv = page_vals.shape[3]
    tids = np.empty(m, np.int32)
    keys = np.empty((m, d), page_keys.dtype)  # stored rows, copied as they are
    vals = np.empty((m, dv), np.float32)
    i = 0
    old_pages = 0
    p = cell_first[h, cs]
    while p >= 0:
        nx = page_next[h, p]
        for j in range(page_fill[h, p]):
            tids[i] = page_tok[h, p, j]
            keys[i] = page_keys[h, p, j]
            if dv > 0:
                vals[i] = page_vals[h, p, j]
            i += 1
        unlink(S, h, p)
        page_release(S, h, p)
        old_pages += 1
        p = nx
    c = S[25][h]
    scratch = np.empty(keys.shape[1], np.float32)
    for i in range(m):
        t = tids[i]
        tok_proj[h, t] = lifted_projection(keys[i], c, u0, new_m, tok_sqn[h, t], scratch)
        if not bisect:
            tok_pkey[h, t] = tok_proj[h, t]
    cell_m[h, cs] = new_m
    proj = np.empty(m, np.float64)
    for i in range(m):
        proj[i] = tok_pkey[h, tids[i]]
    o1 = np.argsort(tids, kind="mergesort")
    o2 = np.argsort(proj[o1], kind="mergesort")
    order = o1[o2]
    npg = layout_sorted(S, h, np.int64(cell), tids[order], keys[order], vals[order])
    bump_chain(S, h, cell, 0, npg - old_pages)


@njit(cache=True, nogil=True)
def neighbour_pkey(S, h, cell, key):
    """A page key for a new child of ``cell`` under the bisect layout: just before its nearest child (squared
    Euclidean distance of the raw keys), so that it joins that child's page; when the keys leave no room
    between the nearest child and the one before it, the nearest child's own key (the token id then puts the
    new child right after it)."""
    tok_sqn, cell_first, tok_pkey = S[5], S[6], S[24]
    page_tok, page_fill, page_next, page_prev, page_keys = S[12], S[13], S[15], S[16], S[21]
    p = cell_first[h, cell_slot(S, h, cell)]
    if p < 0:
        return 0.0
    d = key_dim(key)
    kf = key_row(key, d, np.empty(d, np.float32)).copy()
    c = S[25][h]
    for i in range(d):  # rows are keys / c: <row, new row * c^2> is the keys' dot product
        kf[i] *= c[i] * c[i]
    best, bp, bj = np.inf, -1, -1
    while p >= 0:
        for j in range(page_fill[h, p]):
            dist = tok_sqn[h, page_tok[h, p, j]] - 2.0 * key_dot(page_keys[h, p, j], kf)
            if dist < best:
                best, bp, bj = dist, p, j
        p = page_next[h, p]
    kn = tok_pkey[h, page_tok[h, bp, bj]]
    if bj > 0:
        kp = tok_pkey[h, page_tok[h, bp, bj - 1]]
    elif page_prev[h, bp] >= 0:
        pp = page_prev[h, bp]
        kp = tok_pkey[h, page_tok[h, pp, page_fill[h, pp] - 1]]
    else:
        return kn - 1.0
    mid = np.float32(0.5 * (kp + kn))  # as it will be stored (TREE_FLOAT)
    if mid <= kp or mid >= kn:
        return kn
    return mid


@njit(cache=True, nogil=True)
def attach(S, h, t, parent, key, val, mt, u0, bisect):
    """Put token ``t`` (projected with the squared max-norm ``mt``, float32; ``key``: its stored row) into
    ``parent``'s cell: lift to the cell's m (or raise the cell's m), give it its page key, insert into its pages,
    and add ``t``'s subtree to the ancestors' counters. ``u0``: the index's first projection direction
    (:func:`lifted_projection`). A token in the tree is projected with its cell's ``cell_m``, so no per-token m
    is kept (4 bytes per token and KV head)."""
    tok_parent, tok_proj, tok_sqn, tok_pkey = S[1], S[4], S[5], S[24]
    cell_nchild, cell_m = S[8], S[9]
    cell = parent + 1
    cs = cell_slot(S, h, cell)  # the parent is above level 0: it has a slot
    if cell_nchild[h, cs] == 0:
        cell_m[h, cs] = mt
    else:
        mc = cell_m[h, cs]
        if mt < mc:
            tok_proj[h, t] = lifted_projection(key, S[25][h], u0, mc, tok_sqn[h, t], np.empty(key.shape[0], np.float32))
        elif mt > mc:
            relift_cell(S, h, cell, mt, u0, bisect)
    tok_pkey[h, t] = neighbour_pkey(S, h, cell, key) if bisect else tok_proj[h, t]
    tok_parent[h, t] = parent
    page_insert(S, h, t, cell, key, val)
    bump_chain(S, h, cell, subtree_tokens(S, h, t + 1), subtree_pages(S, h, t + 1))


@njit(cache=True, nogil=True)
def detach(S, h, t):
    """Take token ``t`` (with its subtree) out of its parent's cell."""
    tok_parent = S[1]
    cell = tok_parent[h, t] + 1
    page_remove(S, h, t)
    bump_chain(S, h, cell, -subtree_tokens(S, h, t + 1), -subtree_pages(S, h, t + 1))
    tok_parent[h, t] = -2
