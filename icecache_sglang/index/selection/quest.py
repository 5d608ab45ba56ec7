"""Quest: per positional page, the min and max of every key coordinate bound ``<q, k>`` from above;
pages are ranked by that bound (query-aware, but blind to which tokens are alike)."""

from __future__ import annotations

import numpy as np

from .base import SelectionPolicy, group_size
from .oracle import _positional_tokens


class QuestPolicy(SelectionPolicy):
    name = "quest"

    def build(self, keys: np.ndarray) -> None:
        K = np.asarray(keys, dtype=np.float32)
        H, n, d = K.shape
        C = self.page_size
        npg = -(-n // C)
        pad_lo = np.full((H, npg * C, d), np.inf, np.float32)
        pad_hi = np.full((H, npg * C, d), -np.inf, np.float32)
        pad_lo[:, :n] = K
        pad_hi[:, :n] = K
        self.kmin = pad_lo.reshape(H, npg, C, d).min(axis=2)
        self.kmax = pad_hi.reshape(H, npg, C, d).max(axis=2)
        self.n = n

    def select(self, queries: np.ndarray, budget: int) -> list[np.ndarray]:
        n_pages = max(1, self.check_budget(budget) // self.page_size)
        H = self.kmin.shape[0]
        g = group_size(queries, H)
        out = []
        for h in range(H):
            q = queries[h * g : (h + 1) * g].astype(np.float32)  # [g, d]
            bound = np.maximum(q[:, None, :] * self.kmin[h][None], q[:, None, :] * self.kmax[h][None]).sum(axis=2)
            pages = self.merge_pages(bound, n_pages, queries.shape[1])
            out.append(_positional_tokens(pages[pages >= 0], self.page_size, self.n))
        return out
