"""IceCache: the top pages of the paged M-DCI index (semantic pages)."""

from __future__ import annotations

import numpy as np

from ..config import IndexConfig, QueryParams
from ..paged_index import PagedDCIIndex
from .base import SelectionPolicy


class IceCachePolicy(SelectionPolicy):
    name = "icecache"

    def __init__(self, page_size: int = 16, config: IndexConfig | None = None, params: QueryParams | None = None):
        super().__init__(page_size)
        self.config = config or IndexConfig(page_size=page_size)
        if self.config.page_size != page_size:
            raise ValueError("config.page_size must equal page_size")
        self.params = params or QueryParams()
        self.index: PagedDCIIndex | None = None

    def build(self, keys: np.ndarray) -> None:
        self.index = PagedDCIIndex(keys.shape[0], keys.shape[2], config=self.config)
        self.index.build(keys)

    def select(self, queries: np.ndarray, budget: int) -> list[np.ndarray]:
        n_pages = max(1, self.check_budget(budget) // self.page_size)
        pages = self.index.query(queries, n_pages, self.params, merge=self.merge)
        return [np.sort(self.index.pages_to_positions(h, pages[h][pages[h] >= 0])) for h in range(self.index.H)]
