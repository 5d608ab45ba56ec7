"""Oracles: exact scores, so they bound what an index can reach.

* ``oracle_token``: the budget's best tokens per KV head by mean attention probability of its query heads;
* ``oracle_page``: IceCache's own page layout, pages ranked by their exact max score (the best the index's
  search can do);
* ``oracle_positional``: the same over fixed positional pages of the same size.
"""

from __future__ import annotations

import numpy as np

from ..config import IndexConfig
from ..paged_index import PagedDCIIndex
from .base import SelectionPolicy, group_size, positional_page_scores


def _softmax_rows(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class OracleTokenPolicy(SelectionPolicy):
    name = "oracle_token"

    def build(self, keys: np.ndarray) -> None:
        self.keys = np.asarray(keys, dtype=np.float32)

    def select(self, queries: np.ndarray, budget: int) -> list[np.ndarray]:
        budget = self.check_budget(budget)
        H, n, d = self.keys.shape
        g = group_size(queries, H)
        out = []
        for h in range(H):
            probs = _softmax_rows(queries[h * g : (h + 1) * g].astype(np.float64) @ self.keys[h].T.astype(np.float64) / np.sqrt(d))
            mean = probs.mean(axis=0)
            k = min(budget, n)
            out.append(np.sort(np.argsort(-mean, kind="stable")[:k]))
        return out


class OraclePagePolicy(SelectionPolicy):
    name = "oracle_page"

    def __init__(self, page_size: int = 16, config: IndexConfig | None = None, index: PagedDCIIndex | None = None):
        super().__init__(page_size)
        self.config = config or IndexConfig(page_size=page_size)
        self.index = index

    def build(self, keys: np.ndarray) -> None:
        if self.index is None:
            self.index = PagedDCIIndex(keys.shape[0], keys.shape[2], config=self.config)
            self.index.build(keys)
        self.keys = np.asarray(keys, dtype=np.float32)

    def select(self, queries: np.ndarray, budget: int) -> list[np.ndarray]:
        n_pages = max(1, self.check_budget(budget) // self.page_size)
        idx = self.index
        g = group_size(queries, idx.H)
        out = []
        for h in range(idx.H):
            live = idx.live_pages(h)
            toks = idx.page_tok[h, live]  # [pages, C], -1 beyond fill
            valid = np.arange(idx.C)[None, :] < idx.page_fill[h, live][:, None]
            scores = queries[h * g : (h + 1) * g].astype(np.float32) @ self.keys[h].T  # [g, n]
            per_page = np.where(valid[None], scores[:, np.where(valid, toks, 0)], -np.inf).max(axis=2)
            cols = self.merge_pages(per_page, n_pages, queries.shape[1])
            out.append(np.sort(idx.pages_to_positions(h, live[cols[cols >= 0]])))
        return out


class OraclePositionalPolicy(SelectionPolicy):
    name = "oracle_positional"

    def build(self, keys: np.ndarray) -> None:
        self.keys = np.asarray(keys, dtype=np.float32)

    def select(self, queries: np.ndarray, budget: int) -> list[np.ndarray]:
        n_pages = max(1, self.check_budget(budget) // self.page_size)
        H, n, _ = self.keys.shape
        g = group_size(queries, H)
        out = []
        for h in range(H):
            scores = queries[h * g : (h + 1) * g].astype(np.float32) @ self.keys[h].T
            pages = self.merge_pages(positional_page_scores(scores, self.page_size), n_pages, queries.shape[1])
            out.append(_positional_tokens(pages[pages >= 0], self.page_size, n))
        return out


def _positional_tokens(pages: np.ndarray, page_size: int, n: int) -> np.ndarray:
    toks = (np.sort(pages)[:, None] * page_size + np.arange(page_size)[None]).ravel()
    return toks[toks < n]
