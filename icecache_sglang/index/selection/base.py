"""The interface every token-selection policy implements (IceCache and the evaluation baselines).

A policy sees the keys of one layer, ``[H_kv, n, d]``, and answers, for the query heads of one decode
step (``[H_q, d]``, ``H_q = group * H_kv``, query head ``i`` on KV head ``i // group``), which token
positions each KV head attends to within a budget of ``budget`` tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..gqa_merge import check_merge, merge_scores


class SelectionPolicy(ABC):
    name: str = ""
    #: how the page-ranking policies share a KV head's pages among its query heads (``index/gqa_merge.py``)
    merge: str = "rank"

    def __init__(self, page_size: int = 16) -> None:
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        self.page_size = page_size

    def set_merge(self, merge: str) -> SelectionPolicy:
        self.merge = check_merge(merge)
        return self

    def merge_pages(self, page_scores: np.ndarray, n_pages: int, head_dim: int) -> np.ndarray:
        """One KV head's page set from its query heads' page scores ``[g, pages]`` (the policy's
        ``merge``, softmax scale ``1/sqrt(head_dim)``): page indices, best first, -1 padded."""
        return merge_scores(np.asarray(page_scores, np.float64), page_scores.shape[0], n_pages, self.merge,
                            1.0 / np.sqrt(head_dim))[0]

    @abstractmethod
    def build(self, keys: np.ndarray) -> None:
        """Index the keys ``[H_kv, n, d]`` of one layer."""

    @abstractmethod
    def select(self, queries: np.ndarray, budget: int) -> list[np.ndarray]:
        """Sorted token positions per KV head, at most ``budget`` of them each."""

    @staticmethod
    def check_budget(budget: int) -> int:
        if not isinstance(budget, (int, np.integer)) or budget < 1:
            raise ValueError(f"budget must be a positive number of tokens, got {budget!r}")
        return int(budget)


def group_size(queries: np.ndarray, n_kv: int) -> int:
    if queries.ndim != 2 or queries.shape[0] % n_kv:
        raise ValueError(f"queries must be [group * {n_kv}, d], got {queries.shape}")
    return queries.shape[0] // n_kv


def positional_page_scores(scores: np.ndarray, page_size: int) -> np.ndarray:
    """Max score per positional page of ``page_size`` tokens: ``[rows, n] -> [rows, ceil(n/C)]``."""
    rows, n = scores.shape
    npg = -(-n // page_size)
    pad = np.full((rows, npg * page_size), -np.inf, dtype=np.float64)
    pad[:, :n] = scores
    return pad.reshape(rows, npg, page_size).max(axis=2)

