"""The exact scan (``scan.scan_index``) of many small indexes in one numba call: a decode step's query of a batch.

``scan_index`` runs one index at a time through five or six numba calls (page maxima, the candidates an int8
copy rescores, the rescoring, the merge; then the slots of the chosen pages in NumPy), each with its own
dispatch and, for the parallel ones, its own wake-up of numba's threads. For the small sequences of a batch
that fixed cost was most of the query (2 cores, 12 sequences of 2048 tokens x 3 KV heads x 64: ~160 us per
sequence, ``benchmarks/exact_batch.py``). Here every (sequence, KV head) pair is one work item of one parallel
loop that scores the head's pages, rescores its candidates from the exact keys, merges its query heads and
writes the chosen pages' slots.

The same pages and slots as ``scan_index`` + ``page_positions`` per sequence (tested): the same page scores
(``scan._score_stored_page``), the same candidates and rescoring (``scan.rescore_best``), the same merges
(``gqa_merge._mass_one``, ``search.merge_group_pages``). Long sequences keep ``scan_index``: its work items are
chunks of pages, so one sequence's few KV heads still fill the cores.

The indexes' arrays come from a :class:`~.paged_index.StateList` (unboxed once per index, not per query).
Pure numpy + numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .gqa_merge import _mass_one, check_merge
from .pagetable import STATE_FIELDS
from .scan import NEG_INF, RESCORE_FACTOR, _score_stored_page, head_candidates, rescore_head, top_row
from .search import merge_group_pages

_PAGE_TOK = STATE_FIELDS.index("page_tok")
_PAGE_FILL = STATE_FIELDS.index("page_fill")
_NEXT_PAGE = STATE_FIELDS.index("next_page")
_PAGE_KEYS = STATE_FIELDS.index("page_keys")
_KEY_SCALE = STATE_FIELDS.index("key_scale")


@njit(cache=True, nogil=True, inline="always")
def _merge_head(best, fill, n, g, P, mass, scale, out):
    """A KV head's ``P`` pages (-1 padded into ``out``) from its ``g`` query rows' page scores ``best [g, n]``:
    by estimated attention mass, or rank-interleaved (``scan.merged_pages`` for one head)."""
    if mass:
        _mass_one(best, 0, g, P, scale, out)
        return
    rows = np.full((g, P), -1, np.int32)
    for r in range(g):
        top_row(best[r], fill, n, P, rows[r])
    merged = merge_group_pages(rows, g, P)
    for i in range(P):
        out[i] = merged[0, i]


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def exact_batch(states, positions, which, Q, store, rescore, n_pages, mass, scale, pages, slots):
    """``pages [B, H, P]`` and ``slots [B, H, P, C]`` (filled in; -1 where none) of the exact scan of index
    ``states[which[b]]`` (token positions ``positions[which[b]]``) for ``Q [B, H * g, d]`` float32.
    ``rescore > 0``: the indexes keep int8 rows, scored against the queries times their channel scales, and each
    KV head's candidates (its best ``rescore`` pages by the merge and each query row's best ``rescore /
    RESCORE_FACTOR``) are rescored from ``store [S, H, d]`` (float32 or bfloat16 bits, token ``t``'s row at its
    position) before the merge chooses."""
    B, H = pages.shape[0], pages.shape[1]
    d = Q.shape[2]
    g = Q.shape[1] // H
    for it in prange(B * H):
        b = it // H
        h = it - b * H
        S = states[which[b]]
        pos = positions[which[b]]
        page_tok, page_fill, page_keys = S[_PAGE_TOK], S[_PAGE_FILL], S[_PAGE_KEYS]
        n = S[_NEXT_PAGE][h]
        fill = page_fill[h]
        Qh = np.ascontiguousarray(Q[b, h * g: (h + 1) * g])
        Qs = Qh
        if rescore > 0:  # stored rows are keys / key_scale: score them against the queries times it
            Qs = np.empty_like(Qh)
            ks = S[_KEY_SCALE][h]
            for r in range(g):
                for i in range(d):
                    Qs[r, i] = Qh[r, i] * ks[i]
        best = np.full((g, n), NEG_INF, np.float32)
        for p in range(n):
            f = fill[p]
            if f > 0:
                _score_stored_page(page_keys[h, p].ravel(), f, d, Qs, 0, g, best, p)
        if rescore > 0 and n > 0:  # the candidates ``scan.rescore_best`` takes: each row's best, the head's merge
            per_row = max(1, rescore // RESCORE_FACTOR)
            cand = np.full((g, per_row + rescore), -1, np.int32)
            for r in range(g):
                top_row(best[r], fill, n, per_row, cand[r, :per_row])
            _merge_head(best, fill, n, g, rescore, mass, scale, cand[0, per_row:])
            rescore_head(best, Qh, 0, g, head_candidates(cand, 0, g, n), page_tok, page_fill, pos, store, h)
        chosen = pages[b, h]
        _merge_head(best, fill, n, g, n_pages, mass, scale, chosen)
        for j in range(n_pages):
            p = chosen[j]
            if p < 0:
                continue
            for c in range(fill[p]):
                slots[b, h, j, c] = pos[page_tok[h, p, c]]


def scan_index_batch(states, indexes, Q: np.ndarray, n_pages: int, merge: str = "rank",
                     store: np.ndarray | None = None, rescore: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``scan_index`` (with ``store``) and ``page_positions`` of ``indexes[b]`` for ``Q[b]``, every
    (index, KV head) pair in one parallel loop -> ``pages [B, H, P]``, ``slots [B, H, P, C]`` int32, -1
    padded. ``states``: a long-lived :class:`~.paged_index.StateList` the indexes are kept in. The indexes
    share one shape and key dtype; an int8 one needs ``store``, the exact keys at its positions."""
    merge = check_merge(merge)
    if not indexes:
        raise ValueError("scan_index_batch needs at least one index")
    first = indexes[0]
    H, d, C = first.H, first.d, first.C
    dtype = first.page_keys.dtype
    for idx in indexes:
        if (idx.H, idx.d, idx.C, idx.page_keys.dtype) != (H, d, C, dtype):
            raise ValueError("scan_index_batch needs indexes of one shape and key dtype")
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    if Q.ndim != 3 or Q.shape[0] != len(indexes) or Q.shape[2] != d or Q.shape[1] % H or Q.shape[1] == 0:
        raise ValueError(f"Q must be [{len(indexes)}, a multiple of {H}, {d}], got {list(Q.shape)}")
    if not isinstance(n_pages, (int, np.integer)) or n_pages < 1:
        raise ValueError(f"n_pages must be a positive int, got {n_pages!r}")
    scaled = dtype == np.int8
    if scaled and store is None:
        raise ValueError("an int8 index's exact scan needs the key store to rescore from")
    if rescore is None:
        rescore = RESCORE_FACTOR * int(n_pages) if scaled else 0
    if store is None or not scaled:
        store = np.zeros((1, H, d), np.float32)  # not read
    elif store.ndim != 3 or store.shape[1:] != (H, d) or store.dtype not in (np.float32, np.uint16):
        raise ValueError(f"the exact keys must be a float32 or uint16 (bf16) store [S, {H}, {d}], "
                         f"got {store.dtype} {store.shape}")
    which = np.array([states.slot(idx) for idx in indexes], np.int64)
    B, P = len(indexes), int(n_pages)
    pages = np.full((B, H, P), -1, np.int32)
    slots = np.full((B, H, P, C), -1, np.int32)
    exact_batch(states.states, states.positions, which, Q, store, int(rescore) if scaled else 0, P, merge == "mass",
                1.0 / float(np.sqrt(d)), pages, slots)
    return pages, slots


__all__ = ["exact_batch", "scan_index_batch"]
