"""A low-rank first pass for the exact page selection: read a fraction of the key bytes, rescore the best pages.

The exact selection (``scan.py``) reads every key of every page once per decode step and layer; it is
memory-bound, and on the GPU host it falls behind at long contexts and batch 8 (GPU attempt14). A query's
scores over one KV head's keys vary along few directions, *once the queries are taken into account*: a plain
PCA of the keys keeps the directions the keys vary most in, but a model's queries weigh some channels far
more than others, and on SmolLM2-135M's passkey prompt at 8k tokens a 32-of-64 PCA of the keys keeps the exact
best page in 95.5% of cases; whitened by the queries' second moment, 32 of 64 keep it in 99.2%
(``benchmarks/lowrank_scan.py``; the index holding what lies between the sink and the recent window, as the
server's). So an index that has answered enough queries learns, per KV head:

- ``mean [d]`` of its keys and ``Sq`` the second moment of the queries it was asked (``observe``);
- with ``A = Sq^(1/2)`` (regularized), ``U [d, r]`` the leading eigenvectors of ``A Sk A`` (``Sk``: the keys'
  covariance); keys map to codes ``c = (k - mean) A U``, queries to ``q A^-1 U``, and
  ``q.k ~ q.mean + (q A^-1 U).c``, exact when the keys lie in the span;
- per page slot the code of the token there, as an int8 row over its own float32 scale (``r + 4`` bytes), in
  page order like the index's own key rows, and per page a *summary*: the mean of its live tokens' decoded
  codes and their standard deviations in the leading ``SPREAD_RANK`` values. Codes and summaries follow the
  index through its ``page_version`` (bumped by every change of a page's tokens): at each query the pages whose
  version moved are coded again from the index's own rows (``_Fit.refresh``), so an insert, a deletion or a
  rebuild needs no hook.

A query then scores the codes approximately and keeps each query head's best ``4 P`` distinct pages (a page's
score: its best live token's); those candidates are scored from the index's page copy and, over an int8 copy,
the ones a KV head may choose are rescored from the key store as the exact scan does (``scan.rescore_best``):
the exact scores decide, and a page is missed only if the approximate scores rank it below the candidates.
``selection: lowrank`` scores every page's codes; ``lowrank_pages`` first ranks every page by its summary and
scores the codes of only the pages some query head of the KV head ranks among its best ``PAGE_STAGE_FACTOR x
4 P`` (``summary_pages``; a page scores its mean code's score plus ``SPREAD_WEIGHT`` times its tokens' spread
along the query, so that a page whose best token lies far from its mean ranks higher than by its mean alone): at
most 4 x 16P of ~8200 pages per KV head at 128k tokens and a group of 4 (computed). Until an index has a fitted
basis (too few queries yet, or a fit in progress) it is scanned exactly (``scan.scan_index``). A fit codes
``FIT_CHUNK`` tokens' worth of pages per query it answers, into codes the first pass does not read until every
page is current, so no query pays for a whole encode; a model's layers start their fits on different steps
(``FIT_STAGGER``); a refit follows each time the queries seen grow ``REFIT_GROWTH``-fold (a conversation's
queries drift). Pure numpy + numba.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from numba import njit, prange

from .keys import PARALLEL_MIN, _int8_of, from_storage, key_row
from .prefetch import prefetch_row
from .scan import (NEG_INF, ExactKeys, head_candidates, merged_pages, rescore_best, rescore_count, scan_index,
                   score_pages)

#: indexes with fewer live tokens are scanned exactly: the first pass and its rescoring cost more than they save
#: below ~16k tokens (8 KV heads, d = 128, 2 cores, caches cold: 0.75x the exact scan at 8k, 1.21x at 32k,
#: 1.80x at 128k, ``benchmarks/lowrank_scan.py``; 1.02x at 16k and 1.23x at 24k in a scratch run of stop 35's
#: code, the page stage 1.19x / 1.61x), and short indexes need no codes' memory
MIN_TOKENS = 16384
#: queries (decode steps of a layer) an index answers before its first fit, and the growth between refits
FIT_AFTER = 8
REFIT_GROWTH = 8
#: keys sampled (evenly spaced) to fit a basis: 32 per dimension at d = 128
FIT_SAMPLE = 4096
#: tokens' worth of pages a fit codes per query it answers, and at most the pages an active fit codes again
#: per query (after a rebuild, every page; d x r multiply-adds per token and KV head: a 16k chunk of a
#: d = 128, r = 32 index is 0.5 G, about one exact scan's worth)
FIT_CHUNK = 16384
#: a layer's fit starts ``layer % FIT_STAGGER`` queries after FIT_AFTER, so that a model's layers, which all
#: reach FIT_AFTER at the same decode step, do not all encode at the same steps
FIT_STAGGER = 8
#: the queries' second moment is regularized by this share of its mean eigenvalue
RIDGE = 1e-3
#: pages per work item of the first pass (at least; items are (KV head, run of pages))
MIN_RUN = 128
#: the first pass hands this many times the selected pages per KV head to the exact rescoring (and each
#: query head's best half as many)
LOWRANK_RESCORE_FACTOR = 4
#: the page stage: each query row scores every page's summary (its tokens' mean code and spread) and only the
#: tokens of its best ``PAGE_STAGE_FACTOR`` x (the candidates handed on) pages, once a KV head has four times
#: that many pages (below, every token is scored)
PAGE_STAGE_FACTOR = 4
#: a page's summary score adds to its mean code's score ``SPREAD_WEIGHT sum_b |q_b| s_b`` over the standard
#: deviations ``s`` of its live tokens' codes in the leading ``SPREAD_RANK`` values (the basis is ordered by the
#: share of the queries' score variance each value carries): a page's best token decides, not its average, and a
#: page whose tokens spread along the query reaches further. On real Q/K (the index between the server's sink and
#: window; the share of (step, layer, query head) cases whose exact best page the stage marks, each query row's Y
#: best pages per KV head marked), mean alone -> with the spread: SmolLM2 passkey 8k at Y = 96 0.962 -> 0.991,
#: Qwen essays 16k at Y = 96 0.966 -> 0.981 and at Y = 192 0.987 -> 0.996, as many pages marked. The deviation of
#: a page's scores itself (``2 sqrt(sum_b q_b^2 s_b^2)``) marked the same share (0.992 / 0.982 / 0.995) but needs
#: a second sum per page and row (2.1x the scoring time); a page radius times ``|q|`` 0.74 at Qwen's Y = 192, a
#: Quest-style box of the codes 0.98; all of 32 values' deviations 0.992 / 0.982 / 0.997; weights 1.0 and 0.75
#: up to 0.005 below (scratch measurements). On sources that took no part in that choice, through the whole
#: selection at stage 4 (``benchmarks/lowrank_scan.py``): Qwen passkey 16k 0.976 -> 0.987 of the cases' best pages
#: kept; SmolLM2 essays 8k at stage 1 0.971 -> 0.988
SPREAD_WEIGHT = 1.5
SPREAD_RANK = 8


def spread_rank(rank: int) -> int:
    """How many leading code values a page's summary keeps deviations for, for codes of ``rank`` values."""
    return min(SPREAD_RANK, int(rank))


def default_rank(head_dim: int) -> int:
    """The rank of the codes when none is configured: a quarter of the head dimension, at least 32 (at most
    ``head_dim``). On Qwen2.5-Coder-0.5B's real Q/K at 16k tokens (head_dim 64) rank 16 kept the exact best
    page in 96.6% of cases, rank 32 in 99.2%; on 2 cores a code of 32 values costs 14-28% more first-pass time
    than one of 16 (``benchmarks/lowrank_scan.py``)."""
    return min(head_dim, max(32, head_dim // 4))


def fit_maps(keys: np.ndarray, q_moment: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampled keys ``[H, m, d]`` (float32) and the queries' second moment ``[H, d, d]`` -> (``mean [H, d]``,
    ``kmap [H, d, rank]``, ``qmap [H, d, rank]``): codes are ``(k - mean) kmap``, projected queries ``q qmap``
    (see the module's text)."""
    H, m, d = keys.shape
    mean = keys.mean(axis=1, dtype=np.float64) if m else np.zeros((H, d))
    kmap = np.empty((H, d, rank), np.float32)
    qmap = np.empty((H, d, rank), np.float32)
    for h in range(H):
        Sq = np.asarray(q_moment[h], np.float64)
        Sq = 0.5 * (Sq + Sq.T) + RIDGE * max(np.trace(Sq) / d, 1e-30) * np.eye(d)
        w, V = np.linalg.eigh(Sq)
        w = np.maximum(w, RIDGE * max(w.max(), 1e-30))
        A, Ai = (V * np.sqrt(w)) @ V.T, (V / np.sqrt(w)) @ V.T
        X = (keys[h].astype(np.float64) - mean[h]) @ A
        _, U = np.linalg.eigh(X.T @ X)
        U = U[:, ::-1][:, :rank]
        kmap[h], qmap[h] = A @ U, Ai @ U
    return mean.astype(np.float32), kmap, qmap


def project_queries(Q: np.ndarray, mean: np.ndarray, qmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries ``Q [H * g, d]`` (row ``r`` on KV head ``r // g``) -> (``Q qmap [H * g, rank]``, ``q.mean [H * g]``)."""
    H = qmap.shape[0]
    Qh = Q.reshape(H, Q.shape[0] // H, -1)
    Qr = np.matmul(Qh, qmap).reshape(Q.shape[0], -1)
    qmu = np.einsum("hgd,hd->hg", Qh, mean).reshape(-1)
    return np.ascontiguousarray(Qr, np.float32), np.ascontiguousarray(qmu, np.float32)


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _encode_pages(page_keys, page_tok, page_fill, page_cell, alive, heads, pages, kmap_s, offset, codes, scales,
                  summary):  # pragma: no cover
    """Pages ``(heads[i], pages[i])`` coded from the index's own rows, slot for slot: ``codes[h, p, j] = (k - mean)
    kmap`` as int8 over ``scales[h, p, j]`` (max |value| / 127, ties to even), with ``k`` the stored row times the
    channel scales (folded into ``kmap_s``, ``offset = mean kmap``), and ``summary[h, p]`` the mean of the page's
    live tokens' decoded codes (``[:r]``) and their standard deviations about it in the leading ``summary.shape[2] -
    r`` code values (``[r:]``; zeros for a free or empty page)."""
    d, r = kmap_s.shape[1], kmap_s.shape[2]
    ns = summary.shape[2] - r
    for i in prange(heads.shape[0]):
        h, p = heads[i], pages[i]
        x = np.empty(d, np.float32)
        y = np.empty(r, np.float32)
        acc = np.zeros(r, np.float32)
        n = 0
        f = page_fill[h, p] if page_cell[h, p] >= 0 else 0
        for j in range(f):
            k = key_row(page_keys[h, p, j], d, x)
            for b in range(r):
                y[b] = -offset[h, b]
            for a in range(d):
                v = k[a]
                m = kmap_s[h, a]
                for b in range(r):
                    y[b] += v * m[b]
            amax = np.float32(0.0)
            for b in range(r):
                amax = max(amax, abs(y[b]))
            sc = amax / np.float32(127.0)
            for b in range(r):
                codes[h, p, j, b] = _int8_of(y[b], sc)
            scales[h, p, j] = sc
            if alive[page_tok[h, p, j]]:
                for b in range(r):
                    acc[b] += np.float32(codes[h, p, j, b]) * sc
                n += 1
        inv = np.float32(1.0 / n) if n else np.float32(0.0)
        for b in range(r):
            acc[b] *= inv
            summary[h, p, b] = acc[b]
        var = np.zeros(ns, np.float32)  # about the mean: a second pass over the slots (in cache)
        for j in range(f):
            if alive[page_tok[h, p, j]]:
                sc = scales[h, p, j]
                for b in range(ns):
                    e = np.float32(codes[h, p, j, b]) * sc - acc[b]
                    var[b] += e * e
        for b in range(ns):
            summary[h, p, r + b] = np.sqrt(var[b] * inv)


@njit(cache=True, nogil=True)
def _changed_pages(page_version, seen, page_fill, next_page, limit):  # pragma: no cover
    """The pages ``(heads, pages)`` whose ``page_version`` differs from ``seen``, head by head in id order, cut to
    those whose tokens before them (in that order) number under ``limit`` (-1: no cut; at least one page), and
    how many pages differ in all."""
    H = next_page.shape[0]
    total = 0
    for h in range(H):
        for p in range(next_page[h]):
            if page_version[h, p] != seen[h, p]:
                total += 1
    heads = np.empty(total, np.int64)
    pages = np.empty(total, np.int64)
    k = 0
    start = 0
    for h in range(H):
        for p in range(next_page[h]):
            if page_version[h, p] != seen[h, p]:
                if limit >= 0 and k > 0 and start >= limit:
                    return heads[:k], pages[:k], total
                heads[k] = h
                pages[k] = p
                k += 1
                start += page_fill[h, p]
    return heads[:k], pages[:k], total


class _Fit:
    """Maps and, per page slot, the code of the token there (``codes [H, pages, C, rank]`` int8 over ``scales [H,
    pages, C]``), per page the summary the page stage scores (``summary [H, pages, rank + spread_rank(rank)]``: the
    mean of its live tokens' decoded codes, then their deviations in the leading values) and the index's
    ``page_version`` they were made at (``version [H, pages]``). A page whose version moved (tokens joined, left or
    moved; a rebuild moves every version) is coded again by ``refresh``; ``current``: every page was current at the
    last refresh."""

    def __init__(self, mean, kmap, qmap, pages: int, page_size: int):
        self.mean, self.kmap, self.qmap = mean, kmap, qmap
        H, r = kmap.shape[0], kmap.shape[2]
        self.codes = np.zeros((H, pages, page_size, r), np.int8)
        self.scales = np.zeros((H, pages, page_size), np.float32)
        self.summary = np.zeros((H, pages, r + spread_rank(r)), np.float32)
        self.version = np.zeros((H, pages), np.uint32)  # a page id never allocated is at version 0
        self.current = False
        #: (the key_scale it was made for, kmap with those channel scales folded in, mean @ kmap): the coding's
        #: maps for the index's stored rows, remade when the index's channel scales change
        self._folded = None

    def copy(self) -> _Fit:
        new = object.__new__(_Fit)
        # the versions first: a copy-on-write copy may run on a writer thread while a query refreshes this fit,
        # which writes a page's codes before its version (a copy may then hold new codes at an old version: coded
        # again, never the reverse)
        new.version = self.version.copy()
        new.current = self.current
        new.mean, new.kmap, new.qmap, new._folded = self.mean, self.kmap, self.qmap, self._folded
        k = new.version.shape[1]  # the arrays as wide as the versions read (``_reserve`` may be growing them)
        new.codes, new.scales, new.summary = (self.codes[:, :k].copy(), self.scales[:, :k].copy(),
                                              self.summary[:, :k].copy())
        return new

    def _reserve(self, pages: int) -> None:
        if pages <= self.version.shape[1]:
            return
        H, k = self.version.shape
        codes = np.zeros((H, pages) + self.codes.shape[2:], np.int8)
        scales = np.zeros((H, pages, self.scales.shape[2]), np.float32)
        summary = np.zeros((H, pages, self.summary.shape[2]), np.float32)
        version = np.zeros((H, pages), np.uint32)
        codes[:, :k], scales[:, :k], summary[:, :k], version[:, :k] = self.codes, self.scales, self.summary, self.version
        self.codes, self.scales, self.summary = codes, scales, summary
        self.version = version  # last (``copy`` reads it first)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scales, self.summary, self.version, self.kmap, self.qmap,
                                      self.mean))

    def refresh(self, idx, budget: int | None = None) -> bool:
        """Code every page whose ``page_version`` moved since it was coded, at most ``budget`` tokens' worth (per
        KV head; at least one page); returns whether every page is now current (``current``)."""
        self._reserve(idx.page_fill.shape[1])
        # the pages that changed, head by head, cut to those that start within the budget (>= budget tokens coded)
        limit = -1 if budget is None else int(budget) * idx.H
        heads, pages, todo = _changed_pages(idx.page_version, self.version, idx.page_fill, idx.next_page, limit)
        if heads.size:
            key = self._folded
            if key is None or not np.array_equal(key[0], idx.key_scale):
                kmap_s = np.ascontiguousarray(self.kmap * idx.key_scale[:, :, None])
                offset = np.ascontiguousarray(np.einsum("hd,hdr->hr", self.mean, self.kmap), dtype=np.float32)
                key = self._folded = (idx.key_scale.copy(), kmap_s, offset)
            _encode_pages(idx.page_keys, idx.page_tok, idx.page_fill, idx.page_cell, idx.alive, heads, pages, key[1],
                          key[2], self.codes, self.scales, self.summary)
            self.version[heads, pages] = idx.page_version[heads, pages]  # after the codes (see ``copy``)
        self.current = heads.size == todo
        return self.current


class LowRankState:
    """One index's query-aware low-rank codes (``PagedDCIIndex.lowrank``): the queries' second moment, the
    fitted maps and codes the first pass reads (``active``), and a fit in progress (``pending``)."""

    def __init__(self, num_heads: int, head_dim: int, rank: int, query_aware: bool = True, stagger: int = 0):
        if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= head_dim:
            raise ValueError(f"the low-rank codes' rank must be an int in [1, {head_dim}], got {rank!r}")
        self.rank = int(rank)
        #: False: the maps are a plain PCA of the keys (the queries' moment taken as the identity; an ablation)
        self.query_aware = bool(query_aware)
        self.q_sum = np.zeros((num_heads, head_dim, head_dim), np.float32)  # sum over queries of Qh^T Qh / g
        self.queries = 0  # queries observed (each: all query heads of every KV head)
        self.fits = 0  # fits completed
        self.served = 0  # queries answered through the first pass
        self.next_fit = FIT_AFTER + int(stagger) % FIT_STAGGER
        self.active: _Fit | None = None
        self.pending: _Fit | None = None

    def copy(self) -> LowRankState:
        pending = self.pending  # read once, before ``active``: a finishing fit becomes active, then pending None
        active = self.active  # (a copy-on-write copy may run on a writer thread while a query advances the fit)
        new = object.__new__(LowRankState)
        new.__dict__.update(self.__dict__)
        new.q_sum = self.q_sum.copy()
        new.active = active.copy() if active is not None else None
        new.pending = pending.copy() if pending is not None and pending is not active else None
        return new

    def nbytes(self) -> int:
        return self.q_sum.nbytes + sum(f.nbytes() for f in (self.active, self.pending) if f is not None)

    def observe(self, Q: np.ndarray) -> None:
        """Add a query ``Q [H * g, d]`` to the queries' second moment (kept as a sum; a query with a NaN or an
        infinity is left out)."""
        H = self.q_sum.shape[0]
        Qh = np.asarray(Q, np.float32).reshape(H, Q.shape[0] // H, -1)
        if not np.isfinite(Qh).all():  # one bad query must not poison every later fit
            return
        self.queries += 1
        # a sum (the mean is taken at a fit): two passes over [H, d, d] per query, not a running mean's five
        self.q_sum += np.matmul(Qh.transpose(0, 2, 1), Qh * np.float32(1.0 / Qh.shape[1]))

    @property
    def q_moment(self) -> np.ndarray:
        """The second moment of the queries observed, per KV head ``[H, d, d]``."""
        return self.q_sum / np.float32(max(self.queries, 1))

    def advance(self, idx, store: np.ndarray) -> None:
        """Bring the active codes up to the index (the pages that changed since the last query, at most
        ``FIT_CHUNK`` tokens' worth), then start a fit once due (a key sample from ``store [S, H, d]``, token
        ``t``'s row at ``idx.positions[t]``), or code the next ``FIT_CHUNK`` tokens' worth of pages of the one in
        progress; a fit whose every page is current becomes active."""
        if self.active is not None:
            self.active.refresh(idx, FIT_CHUNK)
        if self.pending is None:
            if self.queries < self.next_fit:
                return
            live = idx.live_ids()
            take = live[np.unique(np.linspace(0, live.size - 1, min(live.size, FIT_SAMPLE)).astype(np.int64))]
            sample = np.ascontiguousarray(from_storage(store[idx.positions[take]]).transpose(1, 0, 2))
            moment = self.q_moment if self.query_aware else np.broadcast_to(np.eye(idx.d, dtype=np.float32),
                                                                            self.q_sum.shape)
            self.next_fit = self.queries * REFIT_GROWTH
            try:
                maps = fit_maps(sample, moment, self.rank)
            except np.linalg.LinAlgError:
                return  # no fit this time: the exact scan (or the active codes) answers until the next
            if all(np.isfinite(m).all() for m in maps):
                self.pending = _Fit(*maps, idx.page_fill.shape[1], idx.C)
            return
        f = self.pending
        if f.refresh(idx, FIT_CHUNK):
            self.active = f  # first: ``copy`` reads ``pending`` before ``active``
            self.pending = None
            self.fits += 1

    def ready(self) -> bool:
        """Whether the active codes were current at the last ``advance`` (the first pass may read them)."""
        return self.active is not None and self.active.current


@njit(cache=True, nogil=True, inline="always")
def _offer(ts, tp, s, p):  # pragma: no cover
    """Offer page ``p`` scored ``s`` to a row's best distinct pages ``ts``/``tp`` (scores descending, -1 free)."""
    X = ts.shape[0]
    if not s > ts[X - 1]:
        return
    i = X - 1
    for u in range(X):  # a page already held keeps its best score, once
        if tp[u] == p:
            if not s > ts[u]:
                return
            i = u
            break
    while i > 0 and s > ts[i - 1]:
        ts[i] = ts[i - 1]
        tp[i] = tp[i - 1]
        i -= 1
    ts[i] = s
    tp[i] = p


#: pages ahead of the one a pass scores whose codes, scales and token ids it prefetches (``prefetch.py``): the
#: pages a query reads lie anywhere, and a page's slots take long enough to score that the core does not reach
#: the next page's loads by itself (the first pass over a tenth of the pages of 128k tokens, caches cold, 2
#: cores: one byte per line read 8 pages ahead 1.36 ms, prefetched 0.86-0.94; a scratch measurement)
PAGES_AHEAD = 8


@njit(cache=True, nogil=True, inline="always")
def _prefetch_page(codes, scales, page_tok, p):  # pragma: no cover
    """Start loading page ``p``'s codes, scales and token ids."""
    prefetch_row(codes, p)
    prefetch_row(scales, p)
    prefetch_row(page_tok, p)


@njit(cache=True, nogil=True, inline="always", fastmath=True)
def _top4(codes, scales, page_tok, page_fill, alive, plist, Qr, qmu, a, ts, tp):  # pragma: no cover
    """The pages ``plist`` of one KV head, slot by slot, scored for query rows ``a .. a + 3``; each row's best
    distinct pages kept in ``ts``/``tp [4, X]`` (a page offered once, with its best live slot). A score at or
    below every row's X-th page costs four compares against thresholds held in registers: a token's liveness
    is read only for the few that pass; the page ``PAGES_AHEAD`` on is prefetched."""
    r = Qr.shape[1]
    X = ts.shape[1]
    q0, q1, q2, q3 = Qr[a], Qr[a + 1], Qr[a + 2], Qr[a + 3]
    m0, m1, m2, m3 = qmu[a], qmu[a + 1], qmu[a + 2], qmu[a + 3]
    b0, b1, b2, b3 = ts[0, X - 1], ts[1, X - 1], ts[2, X - 1], ts[3, X - 1]
    n = plist.shape[0]
    for i in range(min(PAGES_AHEAD, n)):
        _prefetch_page(codes, scales, page_tok, plist[i])
    for i in range(n):
        if i + PAGES_AHEAD < n:
            _prefetch_page(codes, scales, page_tok, plist[i + PAGES_AHEAD])
        p = plist[i]
        c0 = c1 = c2 = c3 = NEG_INF  # the page's best live slot per row, among those past a threshold
        for j in range(page_fill[p]):
            row = codes[p, j]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for k in range(r):
                x = np.float32(row[k])
                s0 += x * q0[k]
                s1 += x * q1[k]
                s2 += x * q2[k]
                s3 += x * q3[k]
            sc = scales[p, j]
            s0, s1, s2, s3 = s0 * sc + m0, s1 * sc + m1, s2 * sc + m2, s3 * sc + m3
            if (s0 > b0 or s1 > b1 or s2 > b2 or s3 > b3) and alive[page_tok[p, j]]:
                c0, c1, c2, c3 = max(c0, s0), max(c1, s1), max(c2, s2), max(c3, s3)
        if c0 > b0 or c1 > b1 or c2 > b2 or c3 > b3:  # one offer per page and row
            _offer(ts[0], tp[0], c0, p)
            _offer(ts[1], tp[1], c1, p)
            _offer(ts[2], tp[2], c2, p)
            _offer(ts[3], tp[3], c3, p)
            b0, b1, b2, b3 = ts[0, X - 1], ts[1, X - 1], ts[2, X - 1], ts[3, X - 1]


@njit(cache=True, nogil=True, inline="always", fastmath=True)
def _top1(codes, scales, page_tok, page_fill, alive, plist, q, m, ts, tp):  # pragma: no cover
    """``_top4`` for one query row ``q`` (a group's last rows when it is not a multiple of four)."""
    r = q.shape[0]
    X = ts.shape[0]
    b = ts[X - 1]
    n = plist.shape[0]
    for i in range(min(PAGES_AHEAD, n)):
        _prefetch_page(codes, scales, page_tok, plist[i])
    for i in range(n):
        if i + PAGES_AHEAD < n:
            _prefetch_page(codes, scales, page_tok, plist[i + PAGES_AHEAD])
        p = plist[i]
        c = NEG_INF
        for j in range(page_fill[p]):
            row = codes[p, j]
            s0 = np.float32(0.0)
            for k in range(r):
                s0 += np.float32(row[k]) * q[k]
            s0 = s0 * scales[p, j] + m
            if s0 > b and s0 > c and alive[page_tok[p, j]]:
                c = s0
        if c > b:
            _offer(ts, tp, c, p)
            b = ts[X - 1]


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def lowrank_candidates(codes, scales, page_tok, page_fill, page_cell, next_page, alive, use, Qr, qmu, X,
                       runs):  # pragma: no cover
    """Per query row, among the pages with ``use [H, pages]`` set, the ``X`` pages with the best approximate
    scores ``q.mean + (q qmap).c`` (a page's best live token) -> (``pages [H_q, X]`` int32, -1 padded, ``scores
    [H_q, X]``), best first. Work items are (KV head, run of pages), ``runs`` per head, each keeping its own best
    pages, merged per row. The codes lie in page order (a page's slots in a row)."""
    H = codes.shape[0]
    g = Qr.shape[0] // H
    ts = np.full((H * runs, g, X), NEG_INF, np.float32)
    tp = np.full((H * runs, g, X), -1, np.int32)
    for it in prange(H * runs):
        h, blk = it // runs, it % runs
        per = (next_page[h] + runs - 1) // runs
        p0, p1 = blk * per, min((blk + 1) * per, next_page[h])
        plist = np.empty(max(p1 - p0, 0), np.int64)
        n = 0
        for p in range(p0, p1):
            if use[h, p] and page_cell[h, p] >= 0:
                plist[n] = p
                n += 1
        plist = plist[:n]
        j = 0
        while j < g:  # query heads four at a time (each code value loaded once per four), each on its own pass
            if j + 4 <= g:
                _top4(codes[h], scales[h], page_tok[h], page_fill[h], alive, plist, Qr, qmu, h * g + j,
                      ts[it, j:j + 4], tp[it, j:j + 4])
                j += 4
            else:
                _top1(codes[h], scales[h], page_tok[h], page_fill[h], alive, plist, Qr[h * g + j], qmu[h * g + j],
                      ts[it, j], tp[it, j])
                j += 1
    out_s = np.full((H * g, X), NEG_INF, np.float32)
    out_p = np.full((H * g, X), -1, np.int32)
    for row in prange(H * g):
        h, j = row // g, row % g
        for blk in range(runs):
            for u in range(X):
                if tp[h * runs + blk, j, u] >= 0:
                    _offer(out_s[row], out_p[row], ts[h * runs + blk, j, u], tp[h * runs + blk, j, u])
    return out_p, out_s


#: bins of the page stage's histogram of a query row's summary scores (``summary_pages``)
_BINS = 64


@njit(cache=True, nogil=True)
def _best_cut(s, n, Y):  # pragma: no cover
    """The cut of the pages ``p < n`` whose score ``s[p]`` is among the ``Y`` best (``-inf``: not a page): every
    page scored at or above it is among them or ties it (``Y`` or a few more, never fewer; every page when there
    are no more than ``Y``; ``+inf`` when none is valid, so that none passes). A histogram of the scores finds
    the bin holding the ``Y``-th best, refined inside it while more than ``Y + Y // 2`` pages would pass."""
    lo, hi = np.float32(np.inf), NEG_INF
    valid = 0
    for p in range(n):
        v = s[p]
        if v > NEG_INF:
            valid += 1
            lo = min(lo, v)
            hi = max(hi, v)
    cut = lo
    if valid > Y:
        hist = np.empty(_BINS, np.int64)
        above = 0  # pages at or above ``hi`` (counted in; the first range holds ``hi`` itself, later ones not)
        for level in range(4):
            if not hi > lo:
                break
            hist[:] = 0
            w = np.float32(_BINS) / (hi - lo)
            for p in range(n):
                v = s[p]
                if v >= lo and (v < hi or (level == 0 and v == hi)):
                    hist[min(_BINS - 1, int((v - lo) * w))] += 1
            k = _BINS - 1
            total = above + hist[k]
            while total < Y and k > 0:
                k -= 1
                total += hist[k]
            new_lo = lo + np.float32(k) / w
            cut = new_lo
            if total <= Y + Y // 2:
                break
            above = total - hist[k]  # refine within bin k
            hi, lo = new_lo + np.float32(1.0) / w, new_lo
        else:  # scores spread over many scales (heavy tails): the Y-th best exactly, among those past the cut
            kept = np.empty(valid, np.float32)
            m = 0
            for p in range(n):
                if s[p] > NEG_INF and s[p] >= cut:
                    kept[m] = s[p]
                    m += 1
            if m > Y:
                cut = np.sort(kept[:m])[m - Y]
    return cut


def summary_pages(summary, page_cell, page_fill, next_page, Qr, qmu, Y: int, runs: int,
                  spread_weight: float | None = None) -> np.ndarray:
    """The page stage: per KV head, the pages among some query row's ``Y`` best by summary score (``_best_cut``)
    -> ``use [H, pages]`` uint8 (1: the first pass scores the page's tokens for every row of the head). For a
    page's ``summary`` row ``[m | s]`` (its mean code, then its tokens' standard deviations in the leading code
    values) a row ``q`` (of ``Qr``) scores ``q.mean + q.m + spread_weight sum_b |q_b| s_b`` (default
    ``SPREAD_WEIGHT``): one dot product with ``[q | spread_weight |q_lead|]``. Scores are computed in work items
    (KV head, run of pages), four rows per loaded summary (``_summary_scores``, fastmath), then each row's cut and
    the pages at or above some row's cut (``_mark_pages``, without fastmath: it compares with -inf)."""
    r = Qr.shape[1]
    ns = spread_rank(r)
    if summary.ndim != 3 or summary.shape[2] != r + ns:
        raise ValueError(f"summary rows must hold a mean of {r} values (the query rows' rank) and {ns} deviations, "
                         f"got {summary.shape}")
    weight = SPREAD_WEIGHT if spread_weight is None else float(spread_weight)
    Qx = np.empty((Qr.shape[0], r + ns), np.float32)
    Qx[:, :r] = Qr
    Qx[:, r:] = np.abs(Qr[:, :ns]) * np.float32(weight)
    return _mark_pages(_summary_scores(summary, page_cell, page_fill, next_page, Qx, qmu, runs), next_page, int(Y))


@njit(cache=True, nogil=True, parallel=True)
def _mark_pages(sc, next_page, Y):  # pragma: no cover
    """``use [H, pages]``: 1 where a page's score ``sc [H_q, pages]`` reaches its row's ``_best_cut`` for some
    query row of its KV head."""
    H = next_page.shape[0]
    g = sc.shape[0] // H
    cut = np.empty(H * g, np.float32)
    for a in prange(H * g):
        cut[a] = _best_cut(sc[a], next_page[a // g], Y)
    use = np.zeros((H, sc.shape[1]), np.uint8)
    for h in prange(H):
        for j in range(g):
            a = h * g + j
            c = cut[a]
            row = sc[a]
            for p in range(next_page[h]):
                if row[p] > NEG_INF and row[p] >= c:
                    use[h, p] = 1
    return use


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _summary_scores(summary, page_cell, page_fill, next_page, Qx, qmu, runs):  # pragma: no cover
    """Every query row's summary score of every page of its KV head, ``[H_q, max pages]`` (-inf: a free or empty
    page; past a head's pages: unset): the dot product of a page's ``summary`` row with the row's ``Qx`` (as wide,
    ``w`` values: ``summary_pages``'s widened query rows)."""
    H, w = summary.shape[0], summary.shape[2]
    g = Qx.shape[0] // H
    n_max = 0
    for h in range(H):
        n_max = max(n_max, next_page[h])
    sc = np.empty((H * g, n_max), np.float32)
    for it in prange(H * runs):
        h, blk = it // runs, it % runs
        per = (next_page[h] + runs - 1) // runs
        p0, p1 = blk * per, min((blk + 1) * per, next_page[h])
        j = 0
        while j < g:
            a = h * g + j
            if j + 4 <= g:
                q0, q1, q2, q3 = Qx[a], Qx[a + 1], Qx[a + 2], Qx[a + 3]
                for p in range(p0, p1):
                    row = summary[h, p]
                    s0 = s1 = s2 = s3 = np.float32(0.0)
                    for i in range(w):
                        x = row[i]
                        s0 += x * q0[i]
                        s1 += x * q1[i]
                        s2 += x * q2[i]
                        s3 += x * q3[i]
                    live = page_cell[h, p] >= 0 and page_fill[h, p] > 0
                    sc[a, p] = s0 + qmu[a] if live else NEG_INF
                    sc[a + 1, p] = s1 + qmu[a + 1] if live else NEG_INF
                    sc[a + 2, p] = s2 + qmu[a + 2] if live else NEG_INF
                    sc[a + 3, p] = s3 + qmu[a + 3] if live else NEG_INF
                j += 4
            else:
                q = Qx[a]
                for p in range(p0, p1):
                    row = summary[h, p]
                    s0 = np.float32(0.0)
                    for i in range(w):
                        s0 += row[i] * q[i]
                    sc[a, p] = s0 + qmu[a] if page_cell[h, p] >= 0 and page_fill[h, p] > 0 else NEG_INF
                j += 1
    return sc


#: candidate pages ahead of the one gathered whose token ids ``candidate_columns`` prefetches (its own constant:
#: numba's cache keeps a global of another module as it was when a kernel was compiled)
COLUMNS_AHEAD = 4


@njit(cache=True, nogil=True, parallel=True)
def candidate_columns(cand, g, page_fill, page_tok):  # pragma: no cover
    """Each KV head's distinct candidate pages among its ``g`` query rows' ``cand [H_q, X]`` (-1 padded) ->
    (``cols [H, g X]`` page ids ascending, -1 padded; their ``fill [H, g X]`` and ``tok [H, g X, C]``; ``count
    [H]``): the columns the candidates are scored and merged in, a few hundred instead of every page. Ascending
    ids keep every tie-break (a tie goes to the lower page) as over all pages. Parallel over KV heads; the token
    ids of the page ``COLUMNS_AHEAD`` on are prefetched (a few hundred rows scattered among thousands)."""
    H, n, C = page_fill.shape[0], page_fill.shape[1], page_tok.shape[2]
    K = g * cand.shape[1]
    cols = np.full((H, K), -1, np.int32)
    fill = np.zeros((H, K), page_fill.dtype)
    tok = np.full((H, K, C), -1, page_tok.dtype)
    count = np.zeros(H, np.int32)
    for h in prange(H):
        pages = np.sort(head_candidates(cand, h, g, n))
        k = pages.shape[0]
        rows = page_tok[h]
        for c in range(min(COLUMNS_AHEAD, k)):
            prefetch_row(rows, pages[c])
        for c in range(k):
            if c + COLUMNS_AHEAD < k:
                prefetch_row(rows, pages[c + COLUMNS_AHEAD])
            p = pages[c]
            cols[h, c] = p
            fill[h, c] = page_fill[h, p]
            tok[h, c] = rows[p]
        count[h] = k
    return cols, fill, tok, count


#: the parts of a first-pass call ``scan_index_lowrank(timings=...)`` times, in order: the codes brought up to the
#: index and the fit advanced (with observing the query), the queries projected and the page stage (its
#: summaries; nothing without it), the first pass over the codes, the candidates scored from the index's page
#: copy (their columns gathered), the exact rescoring from the key store, the merge
PARTS = ("codes", "page_stage", "first_pass", "candidates", "rescore", "merge")


class _Clock:
    """Adds the seconds since the previous lap to ``timings[part]`` (no-op without a dict)."""

    def __init__(self, timings: dict | None):
        self.timings = timings
        self.t = time.perf_counter() if timings is not None else 0.0

    def lap(self, part: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[part] = self.timings.get(part, 0.0) + now - self.t
            self.t = now


def lowrank_rescore_count(n_pages: int) -> int:
    """Pages per KV head the first pass hands to the exact rescoring (``LOWRANK_RESCORE_FACTOR`` x P)."""
    return LOWRANK_RESCORE_FACTOR * int(n_pages)


def _page_runs(n_pages: int, H: int) -> int:
    """Runs of pages per KV head so that the work items fill the threads twice over, each ``MIN_RUN`` pages or
    more."""
    want = max(1, -(-2 * numba.get_num_threads() // H))
    return max(1, min(want, n_pages // MIN_RUN))


def uses_page_stage(idx, X: int, page_stage: int) -> bool:
    """Whether ``candidates`` scores only the tokens of each row's best ``page_stage * X`` pages by summary: a KV
    head must have four times as many pages (else every token is scored)."""
    return page_stage > 0 and 4 * page_stage * int(X) <= int(idx.next_page.min())


def candidates(idx, Q: np.ndarray, X: int, page_stage: int = 0, clock: _Clock | None = None,
               spread_weight: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first pass of an index with current codes -> each query row's ``X`` best pages by approximate score
    and those scores (``[H_q, X]``, best first, -1 / -inf padded). With the page stage (``uses_page_stage``)
    the tokens scored are those of the pages some row of their KV head ranks among its ``page_stage * X`` best
    by summary (``summary_pages``, ``spread_weight`` default ``SPREAD_WEIGHT``); else every token."""
    clock = clock or _Clock(None)
    f = idx.lowrank.active
    Qr, qmu = project_queries(Q, f.mean, f.qmap)
    n = int(idx.next_page.max())
    runs = _page_runs(n, idx.H)
    if uses_page_stage(idx, X, page_stage):
        use = summary_pages(f.summary, idx.page_cell, idx.page_fill, idx.next_page, Qr, qmu, int(page_stage) * int(X),
                            runs, spread_weight)
    else:
        use = np.ones((idx.H, n), np.uint8)
    clock.lap("page_stage")
    out = lowrank_candidates(f.codes, f.scales, idx.page_tok, idx.page_fill, idx.page_cell, idx.next_page, idx.alive,
                             use, Qr, qmu, int(X), runs)
    clock.lap("first_pass")
    return out


def scan_index_lowrank(idx, Q, n_pages: int, store: np.ndarray, merge: str = "rank", rank: int | None = None,
                       rescore: int | None = None, layer: int = 0, min_tokens: int = MIN_TOKENS,
                       page_stage: int = 0, timings: dict | None = None,
                       spread_weight: float | None = None) -> np.ndarray:
    """The exact selection with a low-rank first pass -> ``[H_kv, n_pages]`` int32 (-1 padded), for a
    ``PagedDCIIndex`` whose ``positions`` are rows of ``store`` (the exact keys, which decide): the query is
    observed, a due fit advanced, and until the index's codes cover every token it is scanned exactly
    (``scan.scan_index``). Then each query row's best ``rescore`` pages by approximate score (default
    ``lowrank_rescore_count``) are the candidates: every candidate of a KV head is scored for all its query
    rows from the index's page copy (``scan.score_pages``; contiguous rows), and over an int8 copy the ones the
    exact scan would rescore from the key store are (``scan.rescore_best``); the pages are chosen among the
    candidates by ``merge`` (only among them: a KV head with fewer candidates than ``n_pages``, which an
    explicit ``rescore`` below ``n_pages`` allows, gets fewer pages, -1 padded).
    ``rank``: of the codes an index starts (default ``default_rank``); ``layer``: the model layer of the index
    (its fit is staggered by it, ``FIT_STAGGER``); ``min_tokens``: the threshold (``MIN_TOKENS``; the quality
    benchmark lowers it to measure 4k-8k captures); ``page_stage``: 0 (``selection: lowrank``), every token is
    scored; else the page stage's factor (``candidates``; ``PAGE_STAGE_FACTOR`` for ``lowrank_pages``);
    ``timings``: a dict that receives the seconds each part of a first-pass call took (``PARTS``; a benchmark's
    breakdown), else nothing is timed; ``spread_weight``: the page stage's (default ``SPREAD_WEIGHT``; a
    benchmark's ablation)."""
    clock = _Clock(timings)
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    if Q.ndim != 2 or Q.shape[1] != idx.d or Q.shape[0] % idx.H or Q.shape[0] == 0:
        raise ValueError(f"Q must be [a multiple of {idx.H}, {idx.d}], got {Q.shape}")
    X = max(1, lowrank_rescore_count(n_pages) if rescore is None else int(rescore))
    if idx.lowrank is None:
        if idx.n_live < min_tokens:
            return scan_index(idx, Q, n_pages, merge=merge, store=store)
        idx.lowrank = LowRankState(idx.H, idx.d, default_rank(idx.d) if rank is None else rank, stagger=layer)
    st = idx.lowrank
    st.observe(Q)
    st.advance(idx, store)
    clock.lap("codes")
    # not while the codes are incomplete, nor for an index cut below the threshold (a prefix copy), nor when
    # a KV head's candidates would cover half its pages (a budget of thousands of pages): the exact scan
    if not st.ready() or idx.n_live < min_tokens or 2 * X * (Q.shape[0] // idx.H) > idx.next_page.min():
        return scan_index(idx, Q, n_pages, merge=merge, store=store)
    st.served += 1
    cand, _ = candidates(idx, Q, X, page_stage, clock, spread_weight)
    # the rest runs over each KV head's candidate pages as columns (``candidate_columns``): scored from the
    # index's own page copy, and over an int8 copy the ones a KV head may choose scored from the exact keys, as
    # the exact scan does
    H, g = idx.H, Q.shape[0] // idx.H
    cols, fill, tok, count = candidate_columns(cand, g, idx.page_fill, idx.page_tok)
    best = np.full((Q.shape[0], cols.shape[1]), NEG_INF, np.float32)
    Qs = idx.scaled_queries(Q, np.repeat(np.arange(H), g))  # the page copy's key space (int8: channel scales)
    score_pages(best, cols, idx.page_keys.reshape(H, idx.page_keys.shape[1], -1), idx.page_fill, Qs)
    clock.lap("candidates")
    if idx.page_keys.dtype == np.int8:
        rescore_best(best, fill, count, Q, ExactKeys(store, idx.positions, tok), rescore_count(n_pages), merge)
    clock.lap("rescore")
    chosen = merged_pages(best, fill, count, g, int(n_pages), merge, idx.d)  # [H, n_pages] columns
    out = np.where(chosen >= 0, np.take_along_axis(cols, np.maximum(chosen, 0), axis=1), -1).astype(np.int32)
    clock.lap("merge")
    return out


def warm(idx, store: np.ndarray, Q: np.ndarray) -> None:
    """Run every numba function of this module on a copy of ``idx`` (any size: a fit is forced), for an
    indexer's warmup: a compile inside a real query costs seconds."""
    twin = idx.copy()
    st = twin.lowrank = LowRankState(idx.H, idx.d, default_rank(idx.d))
    for _ in range(FIT_AFTER):
        st.observe(Q)
    for _ in range(2 + -(-twin.n_tokens // FIT_CHUNK)):  # start, encode; bounded (a failed fit would not end)
        st.advance(twin, store)
    if not st.ready():
        raise RuntimeError("the low-rank warmup could not fit its codes")
    for merge in ("rank", "mass"):  # one candidate per query row: the first pass runs on the warmup's few pages
        scan_index_lowrank(twin, Q, 1, store, merge=merge, rescore=1, min_tokens=0, page_stage=0)
    if st.served != 2:
        raise RuntimeError("the low-rank warmup did not run the first pass")
    # the page stage, on whatever pages the warmup has (a real index uses it from 4 x its pages)
    f = twin.lowrank.active
    Qr, qmu = project_queries(np.ascontiguousarray(Q, np.float32), f.mean, f.qmap)
    summary_pages(f.summary, twin.page_cell, twin.page_fill, twin.next_page, Qr, qmu, 1, 1)
    # the conversion with a serial and a parallel variant by size: a real fit's key sample is large
    from_storage(store[np.zeros(-(-PARALLEL_MIN // (idx.H * idx.d)) + 1, np.int64)])


__all__ = ["LowRankState", "candidate_columns", "candidates", "default_rank", "fit_maps", "lowrank_rescore_count",
           "project_queries", "scan_index_lowrank", "summary_pages", "uses_page_stage", "warm"]
