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
    q = queries.astype(np.float64)
    logits = np.concatenate([q[h * g : (h + 1) * g] @ keys[h].T.astype(np.float64) for h in range(H)]) / np.sqrt(d)
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


def dense_output(probs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Dense attention output per query head: ``[H_q, dv]``."""
    H = values.shape[0]
    g = probs.shape[0] // H
    return np.concatenate([probs[h * g : (h + 1) * g] @ values[h].astype(np.float64) for h in range(H)])


def output_rel_err(probs: np.ndarray, values: np.ndarray, selected: list[np.ndarray],
                   dense: np.ndarray | None = None) -> float:
    """``|o_sparse - o_dense| / |o_dense|``: softmax renormalised over the selected tokens.
    ``dense`` (from :func:`dense_output`) may be passed in when several selections share a step."""
    H = values.shape[0]
    g = probs.shape[0] // H
    if dense is None:
        dense = dense_output(probs, values)
    errs = []
    for h, sel in enumerate(selected):
        sel = np.asarray(sel, dtype=np.int64)
        p = probs[h * g : (h + 1) * g][:, sel]  # [g, m]
        z = p.sum(axis=1, keepdims=True)
        o = np.divide(p @ values[h][sel].astype(np.float64), z, out=np.zeros((g, values.shape[2])), where=z > 0)
        ref = dense[h * g : (h + 1) * g]
        errs.append(np.linalg.norm(o - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30))
    return float(np.concatenate(errs).mean())
