"""Exhaustive scan over the key store in slot order: the exact top pages without the index's key copy.

``scan_pages`` (``scan.py``) reads the index's own page-ordered copy of the keys. This scan reads the keys
where SGLang's KV pool (or the key store) keeps them, ``store [slots, H_kv, d]``, token by token in
insertion order, and folds each score into its page through the index's ``tok_page`` map: the same exact
top pages (score descending, ties by lower page id), with no second copy of the keys. A slot's rows of all
KV heads are read once, contiguously, and each head's row is scored for all ``g`` query heads of its
group, four at a time; runs of tokens are the parallel work items, each with its own page maxima.

An experiment for issue 14's memory goal (``benchmarks/store_scan.py`` measures it beside ``scan_pages``);
not yet used by the indexer.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .keys import as_f32
from .scan import NEG_INF, top_pages
from .search import merge_group_pages


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def store_page_maxima(store, slots, tok_page, alive, n_tok, next_page, Q, n_blocks):  # pragma: no cover
    """``best [H_q, max(next_page)]``: each page's best float32 score per query head, from the store's rows
    of the index's live tokens. ``store [S, H, d]`` float32 or uint16 (bfloat16 bits); ``slots [T]`` the
    store row of each token id; ``tok_page [H, T]`` each token's page per head (-1: none).

    The tokens are cut into ``n_blocks`` runs, one work item each (a slot's rows of all KV heads are one
    contiguous read); each run keeps its own maxima (pages hold tokens from anywhere), merged at the end."""
    H, d = store.shape[1], store.shape[2]
    g = Q.shape[0] // H
    n_max = 0
    for h in range(H):
        n_max = max(n_max, next_page[h])
    part = np.full((n_blocks, Q.shape[0], n_max), NEG_INF, np.float32)
    per = (n_tok + n_blocks - 1) // n_blocks
    for blk in prange(n_blocks):
        best = part[blk]
        scratch = np.empty(H * d, np.float32)
        for t in range(blk * per, min((blk + 1) * per, n_tok)):
            if not alive[t]:
                continue
            rows = as_f32(store[slots[t]].reshape(H * d), H * d, scratch)
            for h in range(H):
                p = tok_page[h, t]
                if p < 0:
                    continue
                k = rows[h * d : (h + 1) * d]
                r = h * g
                while r < (h + 1) * g:
                    if r + 4 <= (h + 1) * g:
                        q0, q1, q2, q3 = Q[r], Q[r + 1], Q[r + 2], Q[r + 3]
                        s0 = s1 = s2 = s3 = np.float32(0.0)
                        for i in range(d):
                            x = k[i]
                            s0 += x * q0[i]
                            s1 += x * q1[i]
                            s2 += x * q2[i]
                            s3 += x * q3[i]
                        best[r, p] = max(best[r, p], s0)
                        best[r + 1, p] = max(best[r + 1, p], s1)
                        best[r + 2, p] = max(best[r + 2, p], s2)
                        best[r + 3, p] = max(best[r + 3, p], s3)
                        r += 4
                    else:
                        s0 = np.float32(0.0)
                        for i in range(d):
                            s0 += k[i] * Q[r, i]
                        best[r, p] = max(best[r, p], s0)
                        r += 1
    out = part[0].copy()
    for row in prange(Q.shape[0]):
        for b in range(1, n_blocks):
            for p in range(n_max):
                out[row, p] = max(out[row, p], part[b, row, p])
    return out


def scan_store(store, slots, tok_page, alive, n_tok: int, page_fill, next_page, Q, n_pages: int) -> np.ndarray:
    """Exact top ``n_pages`` pages per KV head -> ``[H_kv, n_pages]`` int32 (-1 padded), like
    ``scan.scan_pages`` over the index's own copy."""
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    H = store.shape[1]
    best = store_page_maxima(store, slots, tok_page, alive, int(n_tok), next_page, Q,
                             max(1, min(numba.get_num_threads(), int(n_tok))))
    rows = top_pages(best, page_fill, next_page, Q.shape[0] // H, int(n_pages))
    return merge_group_pages(rows, Q.shape[0] // H, int(n_pages))


def scan_index_store(idx, store, Q, n_pages: int) -> np.ndarray:
    """``scan_store`` for a ``PagedDCIIndex`` whose ``positions`` are rows of ``store``."""
    n = idx.n_tokens
    return scan_store(store, idx.positions[:n], idx.tok_page, idx.alive, n, idx.page_fill, idx.next_page, Q, n_pages)
