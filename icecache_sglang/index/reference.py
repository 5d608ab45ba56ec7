"""Plain NumPy/Python reference of build and query for one KV head, written for clarity, not speed.

Tests compare :class:`PagedDCIIndex` against it. It shares only the level schedule and the transform
(:mod:`.schedule`, :mod:`.transform`) with the fast path; layout and search are re-implemented here
with Python lists and dicts following index-spec sections 2, 3 and 5 (rules listed in :mod:`.search`).
"""

from __future__ import annotations

import math

import numpy as np

from .schedule import schedule_levels
from .layout import bisect_order
from .transform import (augment_keys, augment_queries, exact_parents, key_projection, make_projection, query_projection,
                        segment_bounds, squared_norms)


def _retrieve_count(mc: int, k_req: int, prop: float, ntr: int) -> int:
    if k_req >= mc:
        return mc
    return min(max(ntr, math.ceil(prop * mc), k_req), mc)


def _window(pn: list[float], qp: float, r: int) -> tuple[int, int]:
    lo = hi = int(np.searchsorted(np.asarray(pn), qp, side="left"))
    while hi - lo < r:
        lo, hi = _grow(pn, qp, lo, hi)
    return lo, hi


def _grow(pn, qp, lo, hi):
    gl = qp - pn[lo - 1] if lo > 0 else math.inf
    gr = pn[hi] - qp if hi < len(pn) else math.inf
    return (lo - 1, hi) if gl <= gr else (lo, hi + 1)


class ReferenceIndex:
    """One head's M-DCI tree with pages, built in bulk."""

    def __init__(self, keys: np.ndarray, page_size: int, p0: float, p_up: float, seed: int,
                 faithful_proj_scale: bool = False, u: np.ndarray | None = None, layout: str = "projection",
                 parent_segment: int | None = None):
        K = np.asarray(keys, dtype=np.float32)
        n, d = K.shape
        self.K = K
        self.C = page_size
        self.faithful = faithful_proj_scale
        self.u = make_projection(d, seed) if u is None else u
        self.level = schedule_levels(n, p0, p_up)
        self.top = int(self.level.max()) if n else -1
        sqn = squared_norms(K)  # the index's norms, bit for bit (einsum's float64 sums differ in the last bits)
        self.M = float(sqn.max()) if n else 0.0
        # float32 values, as the index keeps them (``pagetable.TREE_FLOAT``), computed on in float64
        self.proj = key_projection(K, sqn, self.M, self.u).astype(np.float32).astype(np.float64)
        self.parent = np.full(n, -1, dtype=np.int64)
        for lv in range(self.top):
            ups = np.flatnonzero(self.level == lv + 1)
            # level 0: each run of the build order (segment_bounds) takes its parents from its own level-1 tokens
            bounds = segment_bounds(n, parent_segment) if lv == 0 else np.array([0, n])
            for a, b in zip(bounds[:-1], bounds[1:]):
                kids = np.flatnonzero(self.level[a:b] == lv) + a
                own = ups[(ups >= a) & (ups < b)]
                cand = own if own.size else ups
                if kids.size:
                    self.parent[kids] = cand[exact_parents(K[kids], K[cand], self.M)]
        # cells: children sorted by (projection, token id); ROOT is cell 0, token t owns cell t+1
        self.children: dict[int, list[int]] = {}
        for t in range(n):
            self.children.setdefault(int(self.parent[t]) + 1, []).append(t)
        for c in self.children:
            self.children[c].sort(key=lambda t: (self.proj[t], t))
        # pages: balanced runs of each cell in its page order (the projection order, or the bisection of the
        # cell's keys taken in projection order: layout.py), ids handed out in cell order
        self.pages: list[list[int]] = []
        self.page_of = np.empty(n, dtype=np.int64)
        self.cell_pages: dict[int, int] = {}
        for c in sorted(self.children):
            ch = self.children[c]
            if layout == "bisect" and len(ch) > page_size:
                ch = [ch[i] for i in bisect_order(np.ascontiguousarray(K[ch]), page_size)]
            npg = -(-len(ch) // page_size)
            i = 0
            for g in range(npg):
                take = (len(ch) - i) // (npg - g)
                for t in ch[i : i + take]:
                    self.page_of[t] = len(self.pages)
                self.pages.append(ch[i : i + take])
                i += take
            self.cell_pages[c] = npg
        # cov(t): pages of t's cell and of all cells below
        self.cov = np.zeros(n + 1, dtype=np.int64)
        for t in sorted(range(n), key=lambda t: self.level[t]):
            self.cov[t + 1] += self.cell_pages.get(t + 1, 0)
            self.cov[int(self.parent[t]) + 1] += self.cov[t + 1]

    # -------------------------------------------------------------- search
    def _pn(self, cell: int) -> list[float]:
        ch = self.children.get(cell, [])
        scale = 1.0 if self.faithful else 1.0 / math.sqrt(max(self.M, 1e-30))
        return [self.proj[t] * scale for t in ch]

    def _score(self, q32: np.ndarray, t: int) -> np.float32:
        return np.float32(np.dot(self.K[t].astype(np.float64), q32.astype(np.float64)))

    def _upper(self, cell, q32, qp, fov, P, prop, ntr) -> list[tuple[np.float32, int]]:
        ch = self.children.get(cell, [])
        if not ch:
            return []
        pn = self._pn(cell)
        lo, hi = _window(pn, qp, _retrieve_count(len(ch), fov, prop, ntr))
        cov = sum(self.cov[t + 1] for t in ch[lo:hi])
        while cov < P and hi - lo < len(ch):
            nlo, nhi = _grow(pn, qp, lo, hi)
            cov += self.cov[ch[nlo] + 1] if nlo < lo else self.cov[ch[hi] + 1]
            lo, hi = nlo, nhi
        scored = sorted(((self._score(q32, t), t) for t in ch[lo:hi]), key=lambda x: (-x[0], x[1]))
        return self._cut(scored, fov, P)

    def _cut(self, scored, fov, P):
        out, c = [], 0
        for s, t in scored:
            if len(out) >= fov and c >= P:
                break
            out.append((s, t))
            c += self.cov[t + 1]
        return out

    def _leaf(self, cell, q32, qp, k_req, prop, ntr) -> list[tuple[np.float32, int]]:
        ch = self.children.get(cell, [])
        if not ch:
            return []
        lo, hi = _window(self._pn(cell), qp, _retrieve_count(len(ch), k_req, prop, ntr))
        return [(self._score(q32, t), t) for t in ch[lo:hi]]

    def _descend(self, q, fov, P, prop, ntr):
        """Found upper tokens and the scored children of the final (level-0) cells."""
        q32 = np.asarray(q, dtype=np.float32)
        qp = float(query_projection(q32[None], self.u)[0])
        if self.top < 0:
            return [], []
        if self.top == 0:
            return [], [self._leaf(0, q32, qp, P, prop, ntr)]
        F = self._upper(0, q32, qp, fov, P, prop, ntr)
        found = list(F)
        for _ in range(self.top - 1):
            nxt = []
            for _, t in F:
                nxt += self._upper(t + 1, q32, qp, fov, P, prop, ntr)
            F = self._cut(sorted(nxt, key=lambda x: (-x[0], x[1])), fov, P)
            found += F
        return found, [self._leaf(t + 1, q32, qp, P, prop, ntr) for _, t in F]

    def query(self, q, P: int, fov: int, prop: float = 0.8, ntr: int = 0) -> tuple[list[int], list[np.float32]]:
        """Top-P page ids (best first) and their best scores."""
        found, leaves = self._descend(q, fov, P, prop, ntr)
        best: dict[int, tuple[np.float32, int]] = {}
        for s, t in found + [x for leaf in leaves for x in leaf]:
            p = int(self.page_of[t])
            if p not in best or (s, -t) > (best[p][0], -best[p][1]):
                best[p] = (s, t)
        ranked = sorted(best, key=lambda p: (-best[p][0], best[p][1]))[:P]
        return ranked, [best[p][0] for p in ranked]

    def query_tokens(self, q, k: int, fov: int, prop: float = 0.8, ntr: int = 0) -> list[int]:
        """IceFormer-style token mode: the best k tokens (final cells keep their best k each)."""
        found, leaves = self._descend(q, fov, k, prop, ntr)
        cands = list(found)
        for leaf in leaves:
            cands += sorted(leaf, key=lambda x: (-x[0], x[1]))[:k]
        return [t for _, t in sorted(cands, key=lambda x: (-x[0], x[1]))[:k]]


def dci_search(keys: np.ndarray, q: np.ndarray, k: int, n_comp: int, n_simp: int, seed: int = 0,
               prop_to_retrieve: float = 1.0, prop_to_visit: float = 1.0) -> list[int]:
    """Flat prioritized DCI (index-spec section 2) with ``n_comp x n_simp`` projections over the
    MIPS transform: returns the best ``k`` keys by ``<q, k>`` among the admitted candidates."""
    K = np.asarray(keys, dtype=np.float64)
    n = K.shape[0]
    J = n_comp * n_simp
    u = make_projection(K.shape[1], seed, J)
    M = float(np.einsum("nd,nd->n", K, K).max())
    kp = augment_keys(K, M) @ u.T / math.sqrt(M)
    qp = augment_queries(np.asarray(q, dtype=np.float64)[None])[0] @ u.T
    order = [np.argsort(kp[:, j], kind="stable") for j in range(J)]
    sorted_p = [kp[order[j], j] for j in range(J)]
    cur = []
    for j in range(J):
        a = int(np.searchsorted(sorted_p[j], qp[j]))
        cur.append([a - 1, a])  # next left, next right
    R = max(k, math.ceil(prop_to_retrieve * n))
    V = math.ceil(prop_to_visit * n * n_simp)
    hits = np.zeros((n_comp, n), dtype=np.int64)
    cands: dict[int, float] = {}
    visited = np.zeros(n_comp, dtype=np.int64)  # entries visited per composite index
    scores = K @ np.asarray(q, dtype=np.float64)

    def gap(j):
        lft, rgt = cur[j]
        gl = qp[j] - sorted_p[j][lft] if lft >= 0 else math.inf
        gr = sorted_p[j][rgt] - qp[j] if rgt < n else math.inf
        return min(gl, gr), gl <= gr

    while True:
        progressed = False
        for g in range(n_comp):
            js = range(g * n_simp, (g + 1) * n_simp)
            best_j = min(js, key=lambda j: gap(j)[0])
            gp, left = gap(best_j)
            if gp == math.inf:
                continue
            progressed = True
            if left:
                x = int(order[best_j][cur[best_j][0]])
                cur[best_j][0] -= 1
            else:
                x = int(order[best_j][cur[best_j][1]])
                cur[best_j][1] += 1
            visited[g] += 1
            hits[g, x] += 1
            if hits[g, x] == n_simp and x not in cands:
                cands[x] = scores[x]
        if not progressed:
            break
        if len(cands) >= k and (visited.min() >= V or len(cands) >= R):
            break
    return [t for t, _ in sorted(cands.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
