"""Exhaustive scan over the index's own pages: the exact top pages of a decode step, as a baseline.

``scan_pages`` scores every valid key of every page in use against all query heads of its KV head and
returns the exact top ``n_pages`` pages per KV head (the same GQA merge as the index); ``read_keys`` only
reads the same keys once with the same parallel layout, the time floor of any exhaustive method.

* ``page_keys [H_kv, page_cap, C, d]``: float32, or uint16 holding bfloat16 bits (value = the float32
  whose upper 16 bits are the uint16), or ``[H_kv, page_cap, C, d + 4]`` int8 rows with their scales
  (``keys.py``: an approximate copy, a quarter of float32's bytes); ``page_fill [H_kv, page_cap]`` valid slots per page (free pages:
  0); ``next_page [H_kv]``: pages ``[0, next_page[h])`` are in use; ``Q [H_kv * g, d]`` float32, query
  head ``h * g + r`` reads KV head ``h``.
* Each key is read once per KV head and scored for all ``g`` query heads of the group (float32
  accumulation). Work items are (KV head, chunk of pages), run in parallel, so one KV head fills the cores.
* A page's score for a query head is its best token's score. Per query head the top ``n_pages`` pages are
  chosen by a partial selection (score descending, ties by lower page id, pages with fill 0 never), -1
  padded when fewer pages hold tokens; then :func:`.search.merge_group_pages` merges each KV head's rows
  (``merge="rank"``). ``merge="mass"`` merges the page scores by estimated attention mass instead
  (:mod:`.gqa_merge`).
* Over an int8 copy the scan has a second pass: each KV head's best ``2 * n_pages`` pages by the int8 rows
  (ranked by the same merge, so every query head's best page is among them) are rescored from the exact
  keys (``ExactKeys``: the key store the indexer maps) and the merge runs again; a page is missed only if
  its int8 score ranks it below twice the budget (``benchmarks/int8_keys.py`` measures how often).

Pure numpy + numba.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .gqa_merge import check_merge, merge_by_mass
from .keys import INT8_SCALE_BYTES, key_row, stored_row_factor, stored_row_width, stored_value
from .prefetch import prefetch_bytes, prefetch_row
from .search import merge_group_pages

NEG_INF = np.float32(-np.inf)
#: an int8 page copy's scan rescores this many times the selected pages per KV head from the exact keys
RESCORE_FACTOR = 2
CHUNK_PAGES = 32  # pages per work item (parallel over page chunks: one KV head still fills the cores)
#: candidate pages ahead of the one scored whose rows ``score_pages`` and ``rescore_pages`` prefetch
#: (``prefetch.py``): the candidates lie anywhere among the pages, the store rows anywhere in the store
CANDIDATES_AHEAD = 4


@njit(cache=True, nogil=True)
def _work_items(next_page, chunk):
    """(KV head, first page) of every chunk of pages in use, heads in order."""
    n = 0
    for h in range(next_page.shape[0]):
        n += (next_page[h] + chunk - 1) // chunk
    items = np.empty((n, 2), np.int64)
    k = 0
    for h in range(next_page.shape[0]):
        for p in range(0, next_page[h], chunk):
            items[k, 0] = h
            items[k, 1] = p
            k += 1
    return items


@njit(cache=True, nogil=True, inline="always", fastmath=True)
def _score_stored_page(rows, f, d, Q, r0, r1, best, c):
    """``best[r, c]`` for query rows ``r0 <= r < r1``: the best ``<Q[r], k>`` over a page's ``f`` stored rows
    ``rows`` (flat: float32, bfloat16 bits or int8 rows with their scales), rows in blocks of 4 (a remainder of 3
    or 2 in one block of its own) so each key row is loaded once per block. Each value is widened in registers as the four query rows read it and an int8
    row's scale multiplies its dot products, with no float32 copy of the page first (the int8 page copy of
    128k tokens x 8 KV heads on 2 cores: 9.3 -> 6.8 ms against a copy first; a scratch A/B). Over int8 rows a
    score is ``(sum k8 q) s``, not ``sum (k8 s) q``: the two differ in the last bits."""
    w = stored_row_width(rows, d)
    r = r0
    while r < r1:
        if r + 4 <= r1:
            q0, q1, q2, q3 = Q[r], Q[r + 1], Q[r + 2], Q[r + 3]
            m0 = m1 = m2 = m3 = NEG_INF
            for j in range(f):
                o = j * w
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for i in range(d):
                    x = stored_value(rows, o + i)
                    s0 += x * q0[i]
                    s1 += x * q1[i]
                    s2 += x * q2[i]
                    s3 += x * q3[i]
                sc = stored_row_factor(rows, o, d)
                m0, m1, m2, m3 = max(m0, s0 * sc), max(m1, s1 * sc), max(m2, s2 * sc), max(m3, s3 * sc)
            best[r, c], best[r + 1, c], best[r + 2, c], best[r + 3, c] = m0, m1, m2, m3
            r += 4
        elif r + 3 == r1:  # a group of 3 (SmolLM2) or a remainder of 3 (7 = 4 + 3: Qwen2.5-0.5B) in one pass
            q0, q1, q2 = Q[r], Q[r + 1], Q[r + 2]
            m0 = m1 = m2 = NEG_INF
            for j in range(f):
                o = j * w
                s0 = s1 = s2 = np.float32(0.0)
                for i in range(d):
                    x = stored_value(rows, o + i)
                    s0 += x * q0[i]
                    s1 += x * q1[i]
                    s2 += x * q2[i]
                sc = stored_row_factor(rows, o, d)
                m0, m1, m2 = max(m0, s0 * sc), max(m1, s1 * sc), max(m2, s2 * sc)
            best[r, c], best[r + 1, c], best[r + 2, c] = m0, m1, m2
            r += 3
        elif r + 2 == r1:
            q0, q1 = Q[r], Q[r + 1]
            m0 = m1 = NEG_INF
            for j in range(f):
                o = j * w
                s0 = s1 = np.float32(0.0)
                for i in range(d):
                    x = stored_value(rows, o + i)
                    s0 += x * q0[i]
                    s1 += x * q1[i]
                sc = stored_row_factor(rows, o, d)
                m0, m1 = max(m0, s0 * sc), max(m1, s1 * sc)
            best[r, c], best[r + 1, c] = m0, m1
            r += 2
        else:
            q0 = Q[r]
            m0 = NEG_INF
            for j in range(f):
                o = j * w
                s0 = np.float32(0.0)
                for i in range(d):
                    s0 += stored_value(rows, o + i) * q0[i]
                m0 = max(m0, s0 * stored_row_factor(rows, o, d))
            best[r, c] = m0
            r += 1


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def page_maxima(page_keys, page_fill, next_page, Q, chunk):
    """``best [H_q, max(next_page)]``: each page's best float32 score ``<q, k>`` per query head over its
    valid slots (-inf for pages with fill 0 and beyond a head's ``next_page``). ``page_keys [H, cap, C*d]``."""
    H, d = page_keys.shape[0], Q.shape[1]
    g = Q.shape[0] // H
    n_max = 0
    for h in range(H):
        n_max = max(n_max, next_page[h])
    best = np.full((Q.shape[0], n_max), NEG_INF, np.float32)
    items = _work_items(next_page, chunk)
    for it in prange(items.shape[0]):
        h, p0 = items[it, 0], items[it, 1]
        for p in range(p0, min(p0 + chunk, next_page[h])):
            f = page_fill[h, p]
            if f <= 0:
                continue
            _score_stored_page(page_keys[h, p], f, d, Q, h * g, (h + 1) * g, best, p)
    return best


@njit(cache=True, nogil=True, fastmath=False)
def top_row(scores, fill, n, n_pages, out):
    """The best ``n_pages`` of pages ``[0, n)`` with ``fill > 0`` by ``scores`` (descending, ties by lower page id)
    into ``out`` (left as it is past the count found): an insertion into a sorted buffer of ``n_pages`` entries,
    most pages rejected by one compare. Not inlined and never fast-math: numba would compile an inlined copy, or
    the first caller's, with a fast-math caller's flags (``scan_batch.exact_batch``), and its comparisons would
    then assume no NaN or infinity."""
    top_s = np.empty(n_pages, np.float32)
    k = 0
    for p in range(n):
        if fill[p] <= 0:
            continue
        s = scores[p]
        if k == n_pages and not s > top_s[k - 1]:  # pages come in id order: a tie loses to the kept page
            continue
        i = k if k < n_pages else n_pages - 1
        while i > 0 and s > top_s[i - 1]:
            top_s[i] = top_s[i - 1]
            out[i] = out[i - 1]
            i -= 1
        top_s[i] = s
        out[i] = p
        if k < n_pages:
            k += 1
    return k


@njit(cache=True, nogil=True, parallel=True)
def top_pages(best, page_fill, next_page, g, n_pages):
    """Per query row, the top ``n_pages`` pages with fill > 0 by score (descending, ties by lower page id),
    -1 padded (``top_row``)."""
    rows = np.full((best.shape[0], n_pages), -1, np.int32)
    for row in prange(best.shape[0]):
        h = row // g
        top_row(best[row], page_fill[h], next_page[h], n_pages, rows[row])
    return rows


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def rescore_pages(best, cand, page_tok, page_fill, positions, store, Q):
    """Exact scores for the candidate pages, in place: for every page among ``cand [H_q, X]`` (columns of
    ``best``, -1 padded: page ids, or the low-rank pass's candidate columns with their own ``page_tok`` /
    ``page_fill``) of any query row of a KV head, ``best[r, p]`` of each of that head's rows becomes the page's best
    float32 ``<q, k>`` over the keys as the store holds them (``store [S, H, d]`` float32 or bfloat16 bits,
    the row of token ``t`` at ``positions[t]``). Parallel over KV heads; a page's rows are gathered once and
    scored for the head's ``g`` query rows four at a time, as ``page_maxima`` does."""
    H = store.shape[1]
    g = Q.shape[0] // H
    for h in prange(H):
        rescore_head(best, Q, h * g, (h + 1) * g, head_candidates(cand, h, g, best.shape[1]), page_tok, page_fill,
                     positions, store, h)


@njit(cache=True, nogil=True, inline="always", fastmath=True)
def rescore_head(best, Q, r0, r1, pages, page_tok, page_fill, positions, store, h):
    """``rescore_pages`` for KV head ``h``: ``best[r, p]`` for its query rows ``r0 <= r < r1`` of ``Q`` and each
    page ``p`` of ``pages`` (distinct ids) becomes the page's best score over the store's exact rows, gathered
    once (their loads started ``CANDIDATES_AHEAD`` pages ahead)."""
    d = Q.shape[1]
    row = np.empty(d, np.float32)
    keys = np.empty(page_tok.shape[2] * d, np.float32)
    for i in range(min(CANDIDATES_AHEAD, pages.shape[0])):
        _prefetch_store_rows(store, positions, page_tok, page_fill, h, pages[i])
    for i in range(pages.shape[0]):
        if i + CANDIDATES_AHEAD < pages.shape[0]:
            _prefetch_store_rows(store, positions, page_tok, page_fill, h, pages[i + CANDIDATES_AHEAD])
        p = pages[i]
        f = page_fill[h, p]
        for j in range(f):
            kr = key_row(store[positions[page_tok[h, p, j]], h], d, row)
            for k in range(d):
                keys[j * d + k] = kr[k]
        _score_stored_page(keys, f, d, Q, r0, r1, best, p)


@njit(cache=True, nogil=True, inline="always")
def _prefetch_store_rows(store, positions, page_tok, page_fill, h, p):  # pragma: no cover
    """Start loading the store rows of KV head ``h`` for page ``p``'s tokens."""
    row = store.shape[2] * store.itemsize
    for j in range(page_fill[h, p]):
        prefetch_bytes(store, positions[page_tok[h, p, j]] * store.strides[0] + h * store.strides[1], row)


@njit(cache=True, nogil=True)
def head_candidates(cand, h, g, n_pages):
    """The distinct page ids among the candidates ``cand [H_q, X]`` (-1 padded) of KV head ``h``'s ``g`` query
    rows, in the order first named."""
    seen = np.zeros(n_pages, np.bool_)
    out = np.empty(g * cand.shape[1], np.int32)
    k = 0
    for rr in range(h * g, (h + 1) * g):
        for x in range(cand.shape[1]):
            p = cand[rr, x]
            if p >= 0 and not seen[p]:
                seen[p] = True
                out[k] = p
                k += 1
    return out[:k]


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def score_pages(best, cols, page_keys, page_fill, Q):
    """``page_maxima`` for chosen pages only, in place: ``best[r, c]`` of each query row ``r`` of KV head ``h``
    becomes the best score of page ``cols[h, c]`` (-1: none) over its stored rows (``page_keys [H, pages,
    C * w]``, as ``page_maxima`` reads them; ``Q`` scaled as the rows are). ``best`` has a column per entry of
    ``cols``, not per page: a few candidates of thousands of pages. Parallel over KV heads; a page's rows are
    read once for the head's ``g`` query rows."""
    H, d = page_keys.shape[0], Q.shape[1]
    g = Q.shape[0] // H
    for h in prange(H):
        keys = page_keys[h]
        for c in range(min(CANDIDATES_AHEAD, cols.shape[1])):
            if cols[h, c] >= 0:
                prefetch_row(keys, cols[h, c])
        for c in range(cols.shape[1]):
            if c + CANDIDATES_AHEAD < cols.shape[1] and cols[h, c + CANDIDATES_AHEAD] >= 0:
                prefetch_row(keys, cols[h, c + CANDIDATES_AHEAD])
            p = cols[h, c]
            if p < 0:
                continue
            f = page_fill[h, p]
            if f > 0:
                _score_stored_page(page_keys[h, p], f, d, Q, h * g, (h + 1) * g, best, c)


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _read_sum(page_keys, page_fill, next_page, d, chunk):
    items = _work_items(next_page, chunk)
    part = np.zeros(items.shape[0], np.float32)
    for it in prange(items.shape[0]):
        h, p0 = items[it, 0], items[it, 1]
        w = stored_row_width(page_keys[h, 0], d)
        s = np.float32(0.0)
        for p in range(p0, min(p0 + chunk, next_page[h])):
            f = page_fill[h, p]
            if f <= 0:
                continue
            rows = page_keys[h, p]
            for j in range(f):  # each stored value widened once (the scan's work less its multiply-adds)
                o = j * w
                for i in range(d):
                    s += stored_value(rows, o + i)
        part[it] = s
    return part.sum()


def key_width(page_keys) -> int:
    """The key dimension of stored rows ``page_keys [..., w]`` (an int8 row carries 4 scale bytes)."""
    return page_keys.shape[-1] - (INT8_SCALE_BYTES if page_keys.dtype == np.int8 else 0)


def _check(page_keys, page_fill, next_page):
    if page_keys.ndim != 4 or page_keys.dtype not in (np.float32, np.uint16, np.int8) or not page_keys.flags.c_contiguous:
        raise ValueError(f"page_keys must be a C-contiguous float32, uint16 (bf16) or int8 array [H, pages, C, d "
                         f"(+4 for int8)], got {page_keys.dtype} {page_keys.shape}")
    H, cap = page_keys.shape[:2]
    if page_fill.shape != (H, cap) or next_page.shape != (H,):
        raise ValueError(f"page_fill must be [{H}, {cap}] and next_page [{H}], "
                         f"got {page_fill.shape}, {next_page.shape}")
    if next_page.size and (next_page.min() < 0 or next_page.max() > cap):
        raise ValueError(f"next_page must lie in [0, {cap}]")


class ExactKeys(NamedTuple):
    """Where the exact keys of an index's tokens are, for rescoring an approximate (int8) page copy:
    ``store [S, H, d]`` (float32 or bfloat16 bits), token ``t``'s row at ``positions[t]``, and the tokens of
    each column of the page scores: the index's ``page_tok [H, P, C]``, or a few candidate pages' (the
    low-rank pass's ``candidate_columns``)."""
    store: np.ndarray
    positions: np.ndarray
    page_tok: np.ndarray


def index_exact_keys(idx, store: np.ndarray) -> ExactKeys:
    """``ExactKeys`` of a ``PagedDCIIndex`` whose ``positions`` are rows of ``store``."""
    return ExactKeys(store, idx.positions, idx.page_tok)


def _page_scores(page_keys, page_fill, next_page, Q, n_pages, chunk, exact: ExactKeys | None = None,
                 rescore: int = 0, merge: str = "rank", key_scale: np.ndarray | None = None) -> np.ndarray:
    """Checked inputs -> ``best [H_q, max(next_page)]`` (see ``page_maxima``); with ``exact``, the pages a
    KV head may choose (its best ``rescore`` by the stored rows' scores, ranked by ``merge``, and each of its
    query heads' best ``rescore / RESCORE_FACTOR``) are rescored from the exact keys (``rescore_pages``).
    ``key_scale [H, d]``: the stored rows are keys divided by it (an int8 index's channel scales), so the
    stored rows are scored against the queries times it."""
    _check(page_keys, page_fill, next_page)
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    H, d = page_keys.shape[0], key_width(page_keys)
    if Q.ndim != 2 or Q.shape[1] != d or Q.shape[0] % H or Q.shape[0] == 0:
        raise ValueError(f"Q must be [a multiple of {H}, {d}], got {Q.shape}")
    if not isinstance(n_pages, (int, np.integer)) or n_pages < 1:
        raise ValueError(f"n_pages must be a positive int, got {n_pages!r}")
    flat = page_keys.reshape(H, page_keys.shape[1], -1)
    Qs = Q
    if key_scale is not None:
        if key_scale.shape != (H, d):
            raise ValueError(f"key_scale must be [{H}, {d}], got {key_scale.shape}")
        Qs = np.ascontiguousarray(Q * np.repeat(key_scale, Q.shape[0] // H, axis=0), dtype=np.float32)
    best = page_maxima(flat, page_fill, next_page, Qs, int(chunk))
    if exact is not None and rescore > 0:
        rescore_best(best, page_fill, next_page, Q, exact, int(rescore), merge)
    return best


def rescore_best(best, page_fill, next_page, Q, exact: ExactKeys, rescore: int, merge: str = "rank"):
    """Approximate page scores ``best [H_q, n]`` -> ``best`` with the pages a KV head may choose scored exactly
    from ``exact`` (in place): its best ``rescore`` by ``best``, ranked by ``merge``, and each of its query
    heads' best ``rescore / RESCORE_FACTOR`` (``rescore_pages``)."""
    H, d = page_fill.shape[0], Q.shape[1]
    if rescore <= 0 or not best.shape[1]:
        return best
    store = exact.store
    if store.ndim != 3 or store.shape[1:] != (H, d) or store.dtype not in (np.float32, np.uint16):
        raise ValueError(f"the exact keys must be a float32 or uint16 (bf16) store [S, {H}, {d}], "
                         f"got {store.dtype} {store.shape}")
    g = Q.shape[0] // H
    per_head = merged_pages(best, page_fill, next_page, g, int(rescore), merge, d)  # [H, rescore]
    per_row = top_pages(best, page_fill, next_page, g, max(1, int(rescore) // RESCORE_FACTOR))  # [H_q, P]
    cand = np.full((Q.shape[0], per_row.shape[1] + per_head.shape[1]), -1, np.int32)
    cand[:, : per_row.shape[1]] = per_row
    cand[::g, per_row.shape[1]:] = per_head
    rescore_pages(best, cand, exact.page_tok, page_fill, exact.positions, store, Q)
    return best


def merged_pages(best, page_fill, next_page, g: int, n_pages: int, merge: str, d: int) -> np.ndarray:
    """A KV head's ``n_pages`` pages from its query heads' page scores -> ``[H, n_pages]`` (-1 padded)."""
    if merge == "rank":
        rows = top_pages(best, page_fill, next_page, g, n_pages)
        return merge_group_pages(rows, g, n_pages)
    return merge_by_mass(best, g, n_pages, 1.0 / float(np.sqrt(d)))


def scan_rows(page_keys, page_fill, next_page, Q, n_pages: int, chunk: int = CHUNK_PAGES,
              exact: ExactKeys | None = None, rescore: int = 0, key_scale: np.ndarray | None = None) -> np.ndarray:
    """Exact top ``n_pages`` pages of every query row before the GQA merge -> ``[H_q, n_pages]`` int32."""
    best = _page_scores(page_keys, page_fill, next_page, Q, n_pages, chunk, exact, rescore, key_scale=key_scale)
    H = page_keys.shape[0]
    return top_pages(best, page_fill, next_page, Q.shape[0] // H, int(n_pages))


def rescore_count(n_pages: int) -> int:
    """How many pages per KV head an approximate page copy's scan rescores exactly: ``RESCORE_FACTOR``
    times the pages selected."""
    return RESCORE_FACTOR * int(n_pages)


def scan_pages(page_keys, page_fill, next_page, Q, n_pages: int, chunk: int = CHUNK_PAGES,
               merge: str = "rank", exact: ExactKeys | None = None, rescore: int | None = None,
               key_scale: np.ndarray | None = None) -> np.ndarray:
    """Exact top ``n_pages`` pages per KV head -> ``[H_kv, n_pages]`` int32 (-1 padded), the query heads of a
    KV head merged by ``merge`` (``"rank"``: like ``PagedDCIIndex.query``; ``"mass"``: :mod:`.gqa_merge`).

    With int8 ``page_keys`` (an approximate copy) and ``exact``, the scan ranks by the int8 rows, then
    rescores the pages a KV head may choose (its best ``rescore`` by that ranking, default
    ``rescore_count(n_pages)``, and each query head's best ``n_pages``) from the exact keys before choosing.
    ``key_scale``: the index's channel scales (``PagedDCIIndex.key_scale``) when its rows are scaled keys;
    ``scan_index`` passes an index's own."""
    if rescore is None:
        rescore = rescore_count(n_pages) if page_keys.dtype == np.int8 else 0
    merge = check_merge(merge)
    best = _page_scores(page_keys, page_fill, next_page, Q, n_pages, chunk, exact, rescore, merge, key_scale)
    H = page_keys.shape[0]
    return merged_pages(best, page_fill, next_page, best.shape[0] // H, int(n_pages), merge, key_width(page_keys))


def scan_index(idx, Q, n_pages: int, merge: str = "rank", store: np.ndarray | None = None,
               rescore: int | None = None) -> np.ndarray:
    """``scan_pages`` over a ``PagedDCIIndex``'s own pages (its channel scales applied; an int8 index
    rescored from ``store``, the exact keys at its positions, when given)."""
    scaled = idx.page_keys.dtype == np.int8
    return scan_pages(idx.page_keys, idx.page_fill, idx.next_page, Q, n_pages, merge=merge,
                      exact=index_exact_keys(idx, store) if store is not None else None, rescore=rescore,
                      key_scale=idx.key_scale if scaled else None)


def read_keys(page_keys, next_page, page_fill=None, chunk: int = CHUNK_PAGES) -> float:
    """Read every key of the pages in use once (the scan's parallel layout, each stored value widened to
    float32 as the scan widens it) and return the float32 sum of those values (an int8 row's values before its
    scale): the time floor of an exhaustive scan. With ``page_fill``, only the valid slots (what ``scan_pages``
    reads); without, all ``C`` slots of every page in use."""
    if page_fill is None:
        page_fill = np.full(page_keys.shape[:2], page_keys.shape[2], np.int32)
    _check(page_keys, page_fill, next_page)
    flat = page_keys.reshape(page_keys.shape[0], page_keys.shape[1], -1)
    return float(_read_sum(flat, page_fill, next_page, key_width(page_keys), int(chunk)))


__all__ = ["ExactKeys", "index_exact_keys", "merged_pages", "read_keys", "rescore_best", "rescore_count", "scan_index",
           "rescore_head", "scan_pages", "scan_rows", "score_pages", "top_row"]
