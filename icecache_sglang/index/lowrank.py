"""A low-rank first pass for the exact page selection: read a fraction of the key bytes, rescore the best pages.

The exact selection (``scan.py``) reads every key of every page once per decode step and layer; it is
memory-bound, and on the GPU host it falls behind at long contexts and batch 8 (GPU attempt14). A query's
scores over one KV head's keys vary along few directions, *once the queries are taken into account*: a plain
PCA of the keys keeps the directions the keys vary most in, but a model's queries weigh some channels tens of
times more than others (Qwen2.5's outlier channels), and on Qwen2.5-Coder-0.5B at 16k tokens a 32-of-64 PCA
of the keys keeps the exact best page in 52% of cases; whitened by the queries' second moment, 32 of 64 keep it
in 99.6% (``benchmarks/lowrank_scan.py``). So an index that has answered enough queries learns, per KV head:

- ``mean [d]`` of its keys and ``Sq`` the second moment of the queries it was asked (``observe``);
- with ``A = Sq^(1/2)`` (regularized), ``U [d, r]`` the leading eigenvectors of ``A Sk A`` (``Sk``: the keys'
  covariance); keys map to codes ``c = (k - mean) A U``, queries to ``q A^-1 U``, and
  ``q.k ~ q.mean + (q A^-1 U).c``, exact when the keys lie in the span;
- per token its code as an int8 row over its own float32 scale (``r + 4`` bytes, in token-id order: append-only,
  nothing moves when pages split or the tree is rebuilt).

A query then scores every token approximately and keeps each query head's best ``4 P`` distinct pages (a
page's score: its best token's, through ``tok_page``); those candidates are scored from the index's page
copy and, over an int8 copy, the ones a KV head may choose are rescored from the key store as the exact scan
does (``scan.rescore_best``): the exact scores decide, and a page is missed only if the approximate scores
rank it below the candidates. Until an index has a fitted basis (too few queries yet, or a fit in progress)
it is scanned exactly (``scan.scan_index``). A fit encodes ``FIT_CHUNK`` tokens per query it answers
(parallel, straight from the key store), into codes the first pass does not read until they cover every
token, so no query pays for a whole encode; a model's layers start their fits on different steps
(``FIT_STAGGER``); a refit follows each time the queries seen grow ``REFIT_GROWTH``-fold (a conversation's
queries drift). Pure numpy + numba.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .keys import INT8_SCALE_BYTES, PARALLEL_MIN, _int8_of, from_storage, int8_scales, key_row, to_storage
from .scan import NEG_INF, ExactKeys, head_candidates, merged_pages, rescore_best, rescore_count, scan_index, score_pages

#: indexes with fewer live tokens are scanned exactly: the first pass and its rescoring cost about 1 ms more
#: than they save below ~16k tokens (8 KV heads, d = 128, 2 cores: 0.8x the exact scan at 8k, 1.5x at
#: 32k, 2.4-2.7x at 128k, ``benchmarks/lowrank_scan.py``), and short indexes need no codes' memory
MIN_TOKENS = 16384
#: queries (decode steps of a layer) an index answers before its first fit, and the growth between refits
FIT_AFTER = 8
REFIT_GROWTH = 8
#: keys sampled (evenly spaced) to fit a basis: 32 per dimension at d = 128
FIT_SAMPLE = 4096
#: tokens a fit encodes per query it answers (d x r multiply-adds per token and KV head: a 16k chunk of a
#: d = 128, r = 32 index is 0.5 G, about one exact scan's worth)
FIT_CHUNK = 16384
#: a layer's fit starts ``layer % FIT_STAGGER`` queries after FIT_AFTER, so that a model's layers, which all
#: reach FIT_AFTER at the same decode step, do not all encode at the same steps
FIT_STAGGER = 8
#: the queries' second moment is regularized by this share of its mean eigenvalue
RIDGE = 1e-3
#: tokens per work item of the first pass (at least; items are (KV head, run of tokens))
MIN_RUN = 2048
#: the first pass hands this many times the selected pages per KV head to the exact rescoring (and each
#: query head's best half as many)
LOWRANK_RESCORE_FACTOR = 4


def default_rank(head_dim: int) -> int:
    """The rank of the codes when none is configured: a quarter of the head dimension, at least 32 (at most
    ``head_dim``). On Qwen2.5-Coder-0.5B's real Q/K at 16k tokens (head_dim 64) rank 16 kept the exact best
    page in 98.8% of cases, rank 32 in 99.6%; on 2 cores a code of 32 values costs ~20% more first-pass time
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


def encode(K: np.ndarray, mean: np.ndarray, kmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys ``K [H, n, d]`` -> (codes ``[H, n, rank]`` int8, scales ``[H, n]`` float32): ``(k - mean) kmap`` per
    row over its own scale (kept apart, so a row of rank 32 is one aligned 32-byte read)."""
    x = np.matmul(np.asarray(K, np.float32) - mean[:, None, :], kmap)
    rows = to_storage(np.ascontiguousarray(x, np.float32), "int8")
    return rows[..., :-INT8_SCALE_BYTES], int8_scales(rows)


def project_queries(Q: np.ndarray, mean: np.ndarray, qmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries ``Q [H * g, d]`` (row ``r`` on KV head ``r // g``) -> (``Q qmap [H * g, rank]``, ``q.mean [H * g]``)."""
    H = qmap.shape[0]
    Qh = Q.reshape(H, Q.shape[0] // H, -1)
    Qr = np.matmul(Qh, qmap).reshape(Q.shape[0], -1)
    qmu = np.einsum("hgd,hd->hg", Qh, mean).reshape(-1)
    return np.ascontiguousarray(Qr, np.float32), np.ascontiguousarray(qmu, np.float32)


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _encode_store(store, positions, lo, hi, mean, kmap, codes, scales):  # pragma: no cover
    """Codes of token ids ``[lo, hi)`` from the exact keys (``store [S, H, d]`` float32 or bfloat16 bits, token
    ``t``'s row at ``positions[t]``): ``codes[h, t] = (k - mean[h]) kmap[h]`` as int8 over ``scales[h, t]``
    (as ``encode``: max |value| / 127, ties to even)."""
    H, d, r = store.shape[1], store.shape[2], kmap.shape[2]
    for t in prange(lo, hi):
        x = np.empty(d, np.float32)
        y = np.empty(r, np.float32)
        row = store[positions[t]]
        for h in range(H):
            k = key_row(row[h], d, x)
            y[:] = 0.0
            for i in range(d):
                v = k[i] - mean[h, i]
                m = kmap[h, i]
                for j in range(r):
                    y[j] += v * m[j]
            a = np.float32(0.0)
            for j in range(r):
                a = max(a, abs(y[j]))
            sc = a / np.float32(127.0)
            for j in range(r):
                codes[h, t, j] = _int8_of(y[j], sc)
            scales[h, t] = sc


class _Fit:
    """Maps and codes for token ids ``[0, done)``; complete when ``done`` reaches the index's token count."""

    def __init__(self, mean, kmap, qmap, cap: int):
        self.mean, self.kmap, self.qmap = mean, kmap, qmap
        self.codes = np.zeros((kmap.shape[0], cap, kmap.shape[2]), np.int8)
        self.scales = np.zeros((kmap.shape[0], cap), np.float32)
        self.done = 0

    def copy(self) -> _Fit:
        new = object.__new__(_Fit)
        new.done = self.done  # first: rows below it were written before it was set (a copy-on-write copy may
        # run on a writer thread while a query advances this fit)
        new.mean, new.kmap, new.qmap = self.mean, self.kmap, self.qmap
        new.codes, new.scales = self.codes.copy(), self.scales.copy()
        return new

    def reserve(self, n: int) -> None:
        # both shapes: a copy taken on another thread while this fit grew may hold the new codes, old scales
        if n > self.codes.shape[1] or n > self.scales.shape[1]:
            cap = max(n, self.codes.shape[1] * 5 // 4)
            codes = np.zeros((self.codes.shape[0], cap, self.codes.shape[2]), np.int8)
            scales = np.zeros((self.codes.shape[0], cap), np.float32)
            codes[:, : self.done], scales[:, : self.done] = self.codes[:, : self.done], self.scales[:, : self.done]
            self.codes, self.scales = codes, scales

    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.kmap.nbytes + self.qmap.nbytes + self.mean.nbytes


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

    def inserted(self, ids: np.ndarray, K: np.ndarray) -> None:
        """New tokens ``ids`` (ascending, the index's newest) with keys ``K [H, n, d]`` as the index keeps
        them: the active codes cover them at once; a pending fit reaches them in its turn."""
        f = self.active
        if f is None or not ids.size or int(ids[0]) != f.done:
            return
        f.reserve(int(ids[-1]) + 1)
        f.codes[:, ids], f.scales[:, ids] = encode(K, f.mean, f.kmap)
        f.done = int(ids[-1]) + 1

    def advance(self, idx, store: np.ndarray) -> None:
        """Start a fit once due, or encode the next ``FIT_CHUNK`` tokens of the one in progress (the exact keys:
        ``store [S, H, d]``, token ``t``'s row at ``idx.positions[t]``); a finished fit becomes active."""
        n = idx.n_tokens
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
                self.pending = _Fit(*maps, n)
            return
        f = self.pending
        hi = min(n, f.done + FIT_CHUNK)
        if hi > f.done:
            f.reserve(n)
            # straight from the store, parallel over tokens (dead tokens are coded too, never read)
            _encode_store(store, idx.positions, f.done, hi, f.mean, f.kmap, f.codes, f.scales)
            f.done = hi
        if f.done >= n:
            self.active = f  # first: ``copy`` reads ``pending`` before ``active``
            self.pending = None
            self.fits += 1

    def ready(self, n_tokens: int) -> bool:
        return self.active is not None and self.active.done >= n_tokens


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


@njit(cache=True, nogil=True, inline="always", fastmath=True)
def _top4(codes, scales, tok_page, alive, t0, t1, Qr, qmu, a, ts, tp):  # pragma: no cover
    """Tokens ``[t0, t1)`` of one KV head scored for query rows ``a .. a + 3``; each row's best distinct pages
    kept in ``ts``/``tp [4, X]``. A score at or below every row's X-th page costs four compares against
    thresholds held in registers: a token's page and liveness are read only for the few that pass."""
    r = Qr.shape[1]
    X = ts.shape[1]
    q0, q1, q2, q3 = Qr[a], Qr[a + 1], Qr[a + 2], Qr[a + 3]
    m0, m1, m2, m3 = qmu[a], qmu[a + 1], qmu[a + 2], qmu[a + 3]
    b0, b1, b2, b3 = ts[0, X - 1], ts[1, X - 1], ts[2, X - 1], ts[3, X - 1]
    for t in range(t0, t1):
        row = codes[t]
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for i in range(r):
            x = np.float32(row[i])
            s0 += x * q0[i]
            s1 += x * q1[i]
            s2 += x * q2[i]
            s3 += x * q3[i]
        sc = scales[t]
        s0, s1, s2, s3 = s0 * sc + m0, s1 * sc + m1, s2 * sc + m2, s3 * sc + m3
        if s0 > b0 or s1 > b1 or s2 > b2 or s3 > b3:
            p = tok_page[t]
            if p < 0 or not alive[t]:
                continue
            _offer(ts[0], tp[0], s0, p)
            _offer(ts[1], tp[1], s1, p)
            _offer(ts[2], tp[2], s2, p)
            _offer(ts[3], tp[3], s3, p)
            b0, b1, b2, b3 = ts[0, X - 1], ts[1, X - 1], ts[2, X - 1], ts[3, X - 1]


@njit(cache=True, nogil=True, inline="always", fastmath=True)
def _top1(codes, scales, tok_page, alive, t0, t1, q, m, ts, tp):  # pragma: no cover
    """``_top4`` for one query row ``q`` (a group's last rows when it is not a multiple of four)."""
    r = q.shape[0]
    X = ts.shape[0]
    b = ts[X - 1]
    for t in range(t0, t1):
        row = codes[t]
        s0 = np.float32(0.0)
        for i in range(r):
            s0 += np.float32(row[i]) * q[i]
        s0 = s0 * scales[t] + m
        if s0 > b:
            p = tok_page[t]
            if p < 0 or not alive[t]:
                continue
            _offer(ts, tp, s0, p)
            b = ts[X - 1]


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def lowrank_candidates(codes, scales, tok_page, alive, n_tok, Qr, qmu, X, runs):  # pragma: no cover
    """Per query row, the ``X`` pages with the best approximate scores ``q.mean + (q qmap).c`` (a page's best
    live token) -> (``pages [H_q, X]`` int32, -1 padded, ``scores [H_q, X]``), best first. Work items are
    (KV head, run of tokens), ``runs`` per head, each keeping its own best pages, merged per row.

    Tokens come in id order and their pages in no order: folding every score into its page's maximum was a
    random read-modify-write per token and query head, about half the pass's time at 128k on 2 cores;
    keeping only the best ``X`` distinct pages costs one compare per token and query head."""
    H = codes.shape[0]
    g = Qr.shape[0] // H
    ts = np.full((H * runs, g, X), NEG_INF, np.float32)
    tp = np.full((H * runs, g, X), -1, np.int32)
    per = (n_tok + runs - 1) // runs
    for it in prange(H * runs):
        h, blk = it // runs, it % runs
        t0, t1 = blk * per, min((blk + 1) * per, n_tok)
        j = 0
        while j < g:  # query heads four at a time (each code value loaded once per four), each on its own pass
            if j + 4 <= g:
                _top4(codes[h], scales[h], tok_page[h], alive, t0, t1, Qr, qmu, h * g + j, ts[it, j:j + 4],
                      tp[it, j:j + 4])
                j += 4
            else:
                _top1(codes[h], scales[h], tok_page[h], alive, t0, t1, Qr[h * g + j], qmu[h * g + j], ts[it, j],
                      tp[it, j])
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


@njit(cache=True, nogil=True)
def candidate_columns(cand, g, page_fill, page_tok):  # pragma: no cover
    """Each KV head's distinct candidate pages among its ``g`` query rows' ``cand [H_q, X]`` (-1 padded) ->
    (``cols [H, g X]`` page ids ascending, -1 padded; their ``fill [H, g X]`` and ``tok [H, g X, C]``; ``count
    [H]``): the columns the candidates are scored and merged in, a few hundred instead of every page. Ascending
    ids keep every tie-break (a tie goes to the lower page) as over all pages."""
    H, n, C = page_fill.shape[0], page_fill.shape[1], page_tok.shape[2]
    K = g * cand.shape[1]
    cols = np.full((H, K), -1, np.int32)
    fill = np.zeros((H, K), page_fill.dtype)
    tok = np.full((H, K, C), -1, page_tok.dtype)
    count = np.zeros(H, np.int32)
    for h in range(H):
        pages = np.sort(head_candidates(cand, h, g, n))
        k = pages.shape[0]
        cols[h, :k] = pages
        for c in range(k):
            p = pages[c]
            fill[h, c] = page_fill[h, p]
            tok[h, c] = page_tok[h, p]
        count[h] = k
    return cols, fill, tok, count


def _runs_per_head(n_tok: int, H: int) -> int:
    """Runs of tokens per KV head so that the items fill the threads twice over, each ``MIN_RUN`` or more."""
    want = max(1, -(-2 * numba.get_num_threads() // H))
    return max(1, min(want, n_tok // MIN_RUN))


def lowrank_rescore_count(n_pages: int) -> int:
    """Pages per KV head the first pass hands to the exact rescoring (``LOWRANK_RESCORE_FACTOR`` x P)."""
    return LOWRANK_RESCORE_FACTOR * int(n_pages)


def candidates(idx, Q: np.ndarray, X: int) -> tuple[np.ndarray, np.ndarray]:
    """The first pass of an index with active codes -> each query row's ``X`` best pages by approximate score
    and those scores (``[H_q, X]``, best first, -1 / -inf padded)."""
    f = idx.lowrank.active
    Qr, qmu = project_queries(Q, f.mean, f.qmap)
    n = idx.n_tokens
    return lowrank_candidates(f.codes, f.scales, idx.tok_page, idx.alive, n, Qr, qmu, int(X), _runs_per_head(n, idx.H))


def scan_index_lowrank(idx, Q, n_pages: int, store: np.ndarray, merge: str = "rank", rank: int | None = None,
                       rescore: int | None = None, layer: int = 0, min_tokens: int = MIN_TOKENS) -> np.ndarray:
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
    benchmark lowers it to measure 4k-8k captures)."""
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
    # not while the codes are incomplete, nor for an index cut below the threshold (a prefix copy), nor when
    # a KV head's candidates would cover half its pages (a budget of thousands of pages): the exact scan
    if not st.ready(idx.n_tokens) or idx.n_live < min_tokens or 2 * X * (Q.shape[0] // idx.H) > idx.next_page.min():
        return scan_index(idx, Q, n_pages, merge=merge, store=store)
    st.served += 1
    cand, _ = candidates(idx, Q, X)
    # the rest runs over each KV head's candidate pages as columns (``candidate_columns``): scored from the
    # index's own page copy, and over an int8 copy the ones a KV head may choose scored from the exact keys, as
    # the exact scan does
    H, g = idx.H, Q.shape[0] // idx.H
    cols, fill, tok, count = candidate_columns(cand, g, idx.page_fill, idx.page_tok)
    best = np.full((Q.shape[0], cols.shape[1]), NEG_INF, np.float32)
    Qs = idx.scaled_queries(Q, np.repeat(np.arange(H), g))  # the page copy's key space (int8: channel scales)
    score_pages(best, cols, idx.page_keys.reshape(H, idx.page_keys.shape[1], -1), idx.page_fill, Qs)
    if idx.page_keys.dtype == np.int8:
        rescore_best(best, fill, count, Q, ExactKeys(store, idx.positions, tok), rescore_count(n_pages), merge)
    chosen = merged_pages(best, fill, count, g, int(n_pages), merge, idx.d)  # [H, n_pages] columns
    return np.where(chosen >= 0, np.take_along_axis(cols, np.maximum(chosen, 0), axis=1), -1).astype(np.int32)


def warm(idx, store: np.ndarray, Q: np.ndarray) -> None:
    """Run every numba function of this module on a copy of ``idx`` (any size: a fit is forced), for an
    indexer's warmup: a compile inside a real query costs seconds."""
    twin = idx.copy()
    st = twin.lowrank = LowRankState(idx.H, idx.d, default_rank(idx.d))
    for _ in range(FIT_AFTER):
        st.observe(Q)
    for _ in range(2 + -(-twin.n_tokens // FIT_CHUNK)):  # start, encode; bounded (a failed fit would not end)
        st.advance(twin, store)
    if not st.ready(twin.n_tokens):
        raise RuntimeError("the low-rank warmup could not fit its codes")
    for merge in ("rank", "mass"):  # one candidate per query row: the first pass runs on the warmup's few pages
        scan_index_lowrank(twin, Q, 1, store, merge=merge, rescore=1, min_tokens=0)
    if st.served != 2:
        raise RuntimeError("the low-rank warmup did not run the first pass")
    # the conversions with a serial and a parallel variant by size: a real fit's chunks are large
    f = twin.lowrank.active
    from_storage(store[np.zeros(-(-PARALLEL_MIN // (idx.H * idx.d)) + 1, np.int64)])  # a fit's key sample
    encode(np.zeros((idx.H, -(-PARALLEL_MIN // (idx.H * f.kmap.shape[2])) + 1, idx.d), np.float32), f.mean, f.kmap)


__all__ = ["LowRankState", "candidate_columns", "candidates", "default_rank", "encode", "fit_maps", "lowrank_rescore_count",
           "project_queries", "scan_index_lowrank", "warm"]
