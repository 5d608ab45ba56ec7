"""Quality of a token selection against dense attention (evaluation.md "What to measure").

All functions take one layer's keys ``[H_kv, n, d]`` (values ``[H_kv, n, dv]``), the query heads of one
step ``[H_q, d]`` (query head ``i`` on KV head ``i // group``) and the selected positions per KV head,
and return the mean over query heads.
"""

from __future__ import annotations

import numpy as np


def attention_probs(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """softmax(q.K / sqrt(d)) per query head: ``[H_q, n]`` (float64)."""
    H, n, d = keys.shape
    g = queries.shape[0] // H
    K = np.repeat(keys.astype(np.float64), g, axis=0)  # [H_q, n, d]
    logits = np.einsum("hnd,hd->hn", K, queries.astype(np.float64)) / np.sqrt(d)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def _masks(selected: list[np.ndarray], n: int, group: int) -> np.ndarray:
    m = np.zeros((len(selected) * group, n), dtype=bool)
    for h, sel in enumerate(selected):
        m[h * group : (h + 1) * group, np.asarray(sel, dtype=np.int64)] = True
    return m


def mass_recall(probs: np.ndarray, selected: list[np.ndarray]) -> float:
    """Attention mass that falls on the selected tokens."""
    g = probs.shape[0] // len(selected)
    return float((probs * _masks(selected, probs.shape[1], g)).sum(axis=1).mean())


def recall_at_k(probs: np.ndarray, selected: list[np.ndarray], k: int) -> float:
    """Share of each query head's true top-k tokens that were selected."""
    g = probs.shape[0] // len(selected)
    k = min(k, probs.shape[1])
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    m = _masks(selected, probs.shape[1], g)
    return float(np.take_along_axis(m, top, axis=1).mean())


def output_rel_err(probs: np.ndarray, values: np.ndarray, selected: list[np.ndarray]) -> float:
    """``|o_sparse - o_dense| / |o_dense|``: softmax renormalised over the selected tokens."""
    H = values.shape[0]
    g = probs.shape[0] // H
    V = np.repeat(values.astype(np.float64), g, axis=0)  # [H_q, n, dv]
    m = _masks(selected, probs.shape[1], g)
    dense = np.einsum("hn,hnd->hd", probs, V)
    ps = probs * m
    z = ps.sum(axis=1, keepdims=True)
    sparse = np.einsum("hn,hnd->hd", np.divide(ps, z, out=np.zeros_like(ps), where=z > 0), V)
    err = np.linalg.norm(sparse - dense, axis=1) / np.maximum(np.linalg.norm(dense, axis=1), 1e-30)
    return float(err.mean())
