"""The MIPS -> Euclidean transform (index-spec section 1) and exact parent assignment.

Key k is augmented to ``[k ; sqrt(M - |k|^2)]`` so that every augmented key has squared norm M, where
M is the largest squared key norm; a query is augmented to ``[q/|q| ; 0]``. Euclidean nearest
neighbours of augmented keys are then maximum-inner-product neighbours of the raw vectors.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .keys import PARALLEL_MIN


def make_projection(dim: int, seed: int, n_proj: int = 1) -> np.ndarray:
    """``n_proj`` unit directions in R^{dim+1} (float64), drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n_proj, dim + 1))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return u


def squared_norms(keys: np.ndarray) -> np.ndarray:
    """``|k|^2``, summed in float64 and rounded to float32 (the index keeps its tree's numbers in float32,
    ``pagetable.TREE_FLOAT``: a norm used before it is stored is the one stored, and the largest, M, is one
    of them, so ``M - |k|^2`` never goes negative); the same bits for a key whichever call computes it (a
    build's, an insert's). A float64 array."""
    k = np.asarray(keys)
    if k.dtype not in (np.float32, np.float64):
        k = k.astype(np.float64)
    if not k.shape[-1]:
        return np.zeros(k.shape[:-1])
    rows = np.ascontiguousarray(k.reshape(-1, k.shape[-1]))
    norms = _rows_sqn if rows.size >= PARALLEL_MIN else _rows_sqn_serial
    out = norms(rows).reshape(k.shape[:-1])
    return out[()] if out.ndim == 0 else out  # one key: a scalar, as einsum gave


def augmented_coordinate(sqn: np.ndarray, m: np.ndarray | float) -> np.ndarray:
    return np.sqrt(np.maximum(np.asarray(m, dtype=np.float64) - sqn, 0.0))


def augment_keys(keys: np.ndarray, m: float) -> np.ndarray:
    """``[k ; sqrt(M - |k|^2)]`` for keys ``[..., d]`` -> ``[..., d+1]`` (float64)."""
    k = np.asarray(keys, dtype=np.float64)
    extra = augmented_coordinate(squared_norms(k), m)[..., None]
    return np.concatenate([k, extra], axis=-1)


def augment_queries(queries: np.ndarray) -> np.ndarray:
    q = np.asarray(queries, dtype=np.float64)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    qn = np.divide(q, norm, out=np.zeros_like(q), where=norm > 0)
    return np.concatenate([qn, np.zeros(q.shape[:-1] + (1,))], axis=-1)


def key_projection(keys: np.ndarray, sqn: np.ndarray, m, u: np.ndarray) -> np.ndarray:
    """Raw ("faithful") projection ``w.k + a*sqrt(m - |k|^2)`` on the first direction of ``u``."""
    w, a = u[0, :-1], u[0, -1]
    k = np.asarray(keys)
    if k.dtype != np.float32:
        k = k.astype(np.float64)
    rows = k.reshape(-1, k.shape[-1])
    dot = _rows_dot if rows.size >= PARALLEL_MIN else _rows_dot_serial  # a decode insert's few rows: waking
    # numba's thread pool costs more than the work (5 ms per call beside a 128k index on 2 cores)
    return dot(rows, np.ascontiguousarray(w)).reshape(k.shape[:-1]) + a * augmented_coordinate(sqn, m)


@njit(cache=True, nogil=True, inline="always")
def _row_dot(keys, w, i):
    """``keys[i] . w`` in float64 over four running sums (j mod 4), added in a fixed order: the same bits in
    the serial and the parallel driver (no fastmath: nothing reassociated), and four times the throughput of
    one running sum."""
    d = keys.shape[1]
    s0 = s1 = s2 = s3 = 0.0
    j = 0
    while j + 4 <= d:
        s0 += np.float64(keys[i, j]) * w[j]
        s1 += np.float64(keys[i, j + 1]) * w[j + 1]
        s2 += np.float64(keys[i, j + 2]) * w[j + 2]
        s3 += np.float64(keys[i, j + 3]) * w[j + 3]
        j += 4
    while j < d:
        s0 += np.float64(keys[i, j]) * w[j]
        j += 1
    return (s0 + s1) + (s2 + s3)


@njit(cache=True, nogil=True, parallel=True)
def _rows_sqn(keys):
    """Squared norms of the rows of ``keys``: float64 sums as ``_row_dot``'s, rounded to float32 (held in float64)."""
    out = np.empty(keys.shape[0])
    for i in prange(keys.shape[0]):
        out[i] = np.float32(_row_dot(keys, keys[i], i))
    return out


@njit(cache=True, nogil=True)
def _rows_sqn_serial(keys):
    out = np.empty(keys.shape[0])
    for i in range(keys.shape[0]):
        out[i] = np.float32(_row_dot(keys, keys[i], i))
    return out


@njit(cache=True, nogil=True, parallel=True)
def _rows_dot(keys, w):
    """``keys @ w`` accumulated in float64, row by row in order (no float64 copy of the keys)."""
    out = np.empty(keys.shape[0])
    for i in prange(keys.shape[0]):
        out[i] = _row_dot(keys, w, i)
    return out


@njit(cache=True, nogil=True)
def _rows_dot_serial(keys, w):
    out = np.empty(keys.shape[0])
    for i in range(keys.shape[0]):
        out[i] = _row_dot(keys, w, i)
    return out


def query_projection(queries: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``w.q/|q|`` on the first direction of ``u`` (0 for a zero query)."""
    return augment_queries(queries) @ u[0]


def kk_distance(a: np.ndarray, b: np.ndarray, m: float) -> np.ndarray:
    """``D_kk(a, b) = M - <a,b> - sqrt((M-|a|^2)(M-|b|^2)) = |a~ - b~|^2 / 2`` for all pairs."""
    return m - augment_keys(a, m) @ augment_keys(b, m).T


def _augmented_f32(keys: np.ndarray, sqn: np.ndarray, m: float) -> np.ndarray:
    out = np.empty((keys.shape[0], keys.shape[1] + 1), np.float32)
    out[:, :-1] = keys
    out[:, -1] = augmented_coordinate(sqn, m)
    return out


def augmented_parents(parent_keys: np.ndarray, m: float, parent_sqn: np.ndarray | None = None) -> np.ndarray:
    """The parents' side of :func:`exact_parents`: augmented keys, transposed, ``[d+1, n_parents]``."""
    sqn = squared_norms(parent_keys) if parent_sqn is None else parent_sqn
    return np.ascontiguousarray(_augmented_f32(parent_keys, sqn, m).T)


def exact_parents(child_keys: np.ndarray, parent_keys: np.ndarray | None, m: float, chunk: int = 8192,
                  child_sqn: np.ndarray | None = None, parent_sqn: np.ndarray | None = None,
                  parent_aug_t: np.ndarray | None = None) -> np.ndarray:
    """Index (into ``parent_keys``) of the exact ``D_kk`` nearest parent of every child.

    ``argmin D_kk == argmax <a~, b~>``: one float32 matmul of augmented keys, chunked over children.
    Ties go to the lowest parent index (callers order parents by token id). Squared norms, or the
    parents' side already augmented (:func:`augmented_parents` with the same ``m``), may be passed in.
    """
    n = child_keys.shape[0]
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    if child_sqn is None:
        child_sqn = squared_norms(child_keys)
    pa_t = augmented_parents(parent_keys, m, parent_sqn) if parent_aug_t is None else parent_aug_t
    for s in range(0, n, chunk):
        ca = _augmented_f32(child_keys[s : s + chunk], child_sqn[s : s + chunk], m)
        out[s : s + chunk] = np.argmax(ca @ pa_t, axis=1)
    return out


def segment_bounds(n: int, segment: int | None) -> np.ndarray:
    """Cut ``n`` tokens (build order) into runs of about ``segment`` (each between ``segment/2`` and
    ``1.5 segment``); one run when ``segment`` is None or ``n`` is no longer than it."""
    k = 1 if segment is None or n <= segment else max(1, round(n / segment))
    return (np.arange(k + 1, dtype=np.int64) * n) // k


def segmented_parents(children: np.ndarray, ups: np.ndarray, keys: np.ndarray, m: float, bounds: np.ndarray,
                      chunk: int = 8192, sqn: np.ndarray | None = None) -> np.ndarray:
    """Index (into ``ups``) of each child's exact ``D_kk`` nearest parent among the parents of its own run
    (``bounds``: :func:`segment_bounds` over the build order; ``children`` and ``ups`` are ascending positions
    in that order, ``keys`` / ``sqn`` indexed by them). A run without a parent uses every parent. One run:
    :func:`exact_parents` over all parents. The build's cost is this search: ``n x n p0 x (d+1)``
    multiply-adds per head over the whole prompt, ``n x segment p0 x (d+1)`` in runs."""
    sqn = squared_norms(keys) if sqn is None else sqn
    if len(bounds) <= 2:
        return exact_parents(keys[children], keys[ups], m, chunk, sqn[children], sqn[ups])
    out = np.empty(children.size, np.int64)
    c_at, u_at = np.searchsorted(children, bounds), np.searchsorted(ups, bounds)
    for j in range(len(bounds) - 1):
        c0, c1, u0, u1 = c_at[j], c_at[j + 1], u_at[j], u_at[j + 1]
        if c0 == c1:
            continue
        if u0 == u1:  # no parent in this run: every parent
            u0, u1 = 0, ups.size
        kids, par = children[c0:c1], ups[u0:u1]
        out[c0:c1] = u0 + exact_parents(keys[kids], keys[par], m, chunk, sqn[kids], sqn[par])
    return out
