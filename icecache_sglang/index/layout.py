"""How a cell's children are cut into pages (``IndexConfig.layout``).

A cell's pages are runs of its children in one order (index-spec section 5.1). The order decides which
tokens share a page, so how much of a query's attention a page holds.

* ``projection`` (the spec's, [MD]'s): the children sorted along the index's one random projection (the
  page key is the token's ``tok_proj``). On real Q/K these pages hold less attention than positional pages
  of the same tokens (Qwen2.5-Coder-0.5B, 4k: 0.95-0.97x; ``benchmarks/page_layout.py``).
* ``bisect``: recursive balanced bisection. A part of ``m > C`` children that makes ``npg = ceil(m / C)``
  pages is sorted along its own principal direction (two power iterations from the child farthest from the
  part's mean), refined by a few rounds of two-means (the direction between the means of the two sides) and
  split where the first ``npg // 2`` of the cell's balanced pages end, so every leaf of the recursion is
  exactly one page of ``layout_sorted``'s balanced cut. Similar keys share pages. The page key
  (``tok_pkey``) is the child's rank in that order; a token that joins the cell later (decode inserts,
  children moved by a delete) takes a key just before its nearest child (Euclidean, raw keys), so it lands
  in that child's page. The search still reads a cell's children in projection order (it sorts them when
  the pages do not). Measured at equal tokens: 1.00-1.05x positional pages' attention
  (``benchmarks/page_layout.py``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .config import LAYOUTS

POWER_ITERS = 2
TWO_MEANS_ITERS = 2


INSERTION_SORT_MAX = 256


@njit(cache=True, nogil=True)
def sort_by(proj, ids, a, m, scratch):
    """Stable sort of ``ids[a:a+m]`` by ``proj[:m]`` (finite), as ``np.argsort(kind="mergesort")`` orders
    them; ``proj`` is left in any order. A part of a cell is small (a level-0 parent's cell holds about
    1 / p0 = 100 children): an insertion sort in place, not a sort that allocates; larger parts (a hub
    parent's cell) are sorted by mergesort and permuted through ``scratch``. (The allocations, not the arithmetic, were most of the
    bisection's time: a 128k x 8-head layer's cells run about 64k splits.)"""
    if m <= INSERTION_SORT_MAX:
        for i in range(1, m):
            key = proj[i]
            idv = ids[a + i]
            j = i - 1
            while j >= 0 and proj[j] > key:
                proj[j + 1] = proj[j]
                ids[a + j + 1] = ids[a + j]
                j -= 1
            proj[j + 1] = key
            ids[a + j + 1] = idv
        return
    order = np.argsort(proj[:m], kind="mergesort")
    for i in range(m):
        scratch[i] = ids[a + order[i]]
    ids[a:a + m] = scratch[:m]


@njit(cache=True, nogil=True, fastmath=True)
def _split(X, ids, a, b, left, mean, v, w, proj, scratch, n_power, n_lloyd):
    """Sort ``ids[a:b]`` (rows of ``X``) along the part's split direction. The rows stay where they are: each
    is read through ``ids``, in the part's current order (moving them after every sort was most of the
    bisection's time)."""
    m = b - a
    d = X.shape[1]
    mean[:] = 0.0
    for i in range(a, b):
        row = X[ids[i]]
        for k in range(d):
            mean[k] += row[k]
    mean /= m
    far, far_d = a, np.float32(-1.0)
    for i in range(a, b):
        row = X[ids[i]]
        s = np.float32(0.0)
        for k in range(d):
            x = row[k] - mean[k]
            s += x * x
        if s > far_d:
            far_d, far = s, i
    if far_d <= 0.0:  # every key of the part is the same: any order
        return
    row = X[ids[far]]
    for k in range(d):
        v[k] = row[k] - mean[k]
    v /= np.sqrt(far_d)  # a unit start: the first iteration's sums stay of the keys' scale squared
    for _ in range(n_power):  # v <- Xc^T (Xc v), normalised
        w[:] = 0.0
        for i in range(a, b):
            row = X[ids[i]]
            s = np.float32(0.0)
            for k in range(d):
                s += (row[k] - mean[k]) * v[k]
            for k in range(d):
                w[k] += s * (row[k] - mean[k])
        nv = np.sqrt((w * w).sum())
        if nv == 0.0:
            break
        v[:] = w / nv
    for it in range(n_lloyd + 1):
        for i in range(a, b):
            row = X[ids[i]]
            s = np.float32(0.0)
            for k in range(d):
                s += row[k] * v[k]
            proj[i - a] = s
        sort_by(proj, ids, a, m, scratch)
        if it == n_lloyd:
            break
        w[:] = 0.0  # the direction between the two sides' means
        mean[:] = 0.0
        for i in range(a, a + left):
            row = X[ids[i]]
            for k in range(d):
                w[k] += row[k]
        for i in range(a + left, b):
            row = X[ids[i]]
            for k in range(d):
                mean[k] += row[k]
        v[:] = mean / (m - left) - w / left
        if not (v * v).sum() > 0.0:
            break


@njit(cache=True, nogil=True)
def _bisect_rows(X, ids, C, n_power, n_lloyd):
    """Reorder ``ids`` (rows of ``X``) into their ``bisect`` order, in place; the rows are read through
    ``ids`` where they lie. (Copying a cell's rows next to each other first, as this did, cost 7% of a
    128k-token layer's bisection and gained nothing: a cell's ~100 rows stay in cache over its splits.)"""
    m, d = ids.shape[0], X.shape[1]
    mean = np.empty(d, np.float32)  # float32 throughout: twice the lanes of float64 (18% of the bisection;
    v = np.empty(d, np.float32)  # the same layouts as float64 on the comparison builds, 2026-11-28)
    w = np.empty(d, np.float32)
    proj = np.empty(max(m, 1), np.float32)
    scratch = np.empty(max(m, 1), ids.dtype)
    stack = np.empty((2 * (m // max(C, 1)) + 4, 2), np.int64)
    stack[0, 0], stack[0, 1] = 0, m
    top = 1
    while top > 0:
        top -= 1
        a, b = stack[top, 0], stack[top, 1]
        n = b - a
        if n <= C:
            continue
        npg = (n + C - 1) // C
        q, r = n // npg, n % npg
        k = npg // 2
        left = k * q + max(0, k - (npg - r))  # the first k balanced pages: q tokens each, then q + 1
        _split(X, ids, a, b, left, mean, v, w, proj, scratch, n_power, n_lloyd)
        stack[top, 0], stack[top, 1] = a, a + left
        stack[top + 1, 0], stack[top + 1, 1] = a + left, b
        top += 2


@njit(cache=True, nogil=True)
def bisect_order(X, C, n_power=POWER_ITERS, n_lloyd=TWO_MEANS_ITERS):
    """The ``bisect`` order of the rows of ``X [m, d]`` (float32, finite) for pages of ``C``: a permutation whose
    balanced runs (``layout_sorted``'s cut) are the leaves of the recursive bisection."""
    ids = np.arange(X.shape[0])
    _bisect_rows(X.astype(np.float32), ids, C, n_power, n_lloyd)  # the keys as the index cuts them (float32)
    return ids


@njit(cache=True, nogil=True, parallel=True)
def bisect_cells(order, cells_sorted, X, C):
    """Reorder each cell's run of ``order`` (rows of ``X``, sorted by cell: runs of equal ``cells_sorted``)
    into its ``bisect_order``, cells in parallel."""
    n = order.shape[0]
    n_runs = 0
    for i in range(n):
        if i == 0 or cells_sorted[i] != cells_sorted[i - 1]:
            n_runs += 1
    starts = np.empty(n_runs + 1, np.int64)
    k = 0
    for i in range(n):
        if i == 0 or cells_sorted[i] != cells_sorted[i - 1]:
            starts[k] = i
            k += 1
    starts[n_runs] = n
    for c in prange(n_runs):
        a, b = starts[c], starts[c + 1]
        if b - a > C:
            _bisect_rows(X, order[a:b], C, POWER_ITERS, TWO_MEANS_ITERS)


__all__ = ["LAYOUTS", "bisect_cells", "bisect_order", "sort_by"]
