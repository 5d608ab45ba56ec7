"""Seeded synthetic keys and queries for tests and benchmarks (index-spec T11 settings).

* ``clustered_keys``: Gaussian clusters at random positions in the sequence; each query points at one
  cluster's centre, so its attention concentrates on that cluster's tokens wherever they sit.
* ``lowrank_keys``: a shared mean plus a low-rank component plus noise ("LLM-like" keys).
"""

from __future__ import annotations

import numpy as np


def clustered_keys(rng: np.random.Generator, n: int, d: int, n_clusters: int = 256, n_queries: int = 20,
                   heads: int = 1, group: int = 1, spread: float = 0.35, q_scale: float = 1.0):
    """Keys ``[heads, n, d]`` and per-step queries ``[n_queries, heads * group, d]`` (float32)."""
    K = np.empty((heads, n, d), np.float32)
    Q = np.empty((n_queries, heads * group, d), np.float32)
    for h in range(heads):
        centers = rng.standard_normal((n_clusters, d))
        K[h] = centers[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, d))
        picks = rng.integers(0, n_clusters, (n_queries, group))
        Q[:, h * group : (h + 1) * group] = q_scale * centers[picks] + 0.1 * rng.standard_normal((n_queries, group, d))
    return K, Q


def lowrank_keys(rng: np.random.Generator, n: int, d: int, rank: int = 8, n_queries: int = 20,
                 heads: int = 1, group: int = 1, mean_scale: float = 2.0, noise: float = 0.3, q_scale: float = 8.0):
    """Keys ``[heads, n, d]`` = mean + low-rank + noise, queries in the same low-rank subspace."""
    K = np.empty((heads, n, d), np.float32)
    Q = np.empty((n_queries, heads * group, d), np.float32)
    for h in range(heads):
        basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T * np.sqrt(d / rank)  # [rank, d]
        mean = mean_scale * rng.standard_normal(d)
        K[h] = mean + rng.standard_normal((n, rank)) @ basis + noise * rng.standard_normal((n, d))
        Q[:, h * group : (h + 1) * group] = q_scale * (rng.standard_normal((n_queries, group, rank)) @ basis) / np.sqrt(d)
    return K, Q
