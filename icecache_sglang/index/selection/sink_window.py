"""Sink + window around any policy: how IceCache runs (index-spec section 5.3 item 5).

The first ``sink`` and last ``window`` tokens are always attended and never indexed; the inner
policy indexes the tokens between them and spends the rest of the budget there.
"""

from __future__ import annotations

import numpy as np

from .base import SelectionPolicy


def default_sink_window(budget: int) -> tuple[int, int]:
    """``min(32, budget // 4)`` tokens each: 32 + 32 at a 256-token budget (the reference 2 + 2 pages of 16)."""
    s = min(32, budget // 4)
    return s, s


class SinkWindowPolicy(SelectionPolicy):
    def __init__(self, inner: SelectionPolicy, sink: int, window: int):
        super().__init__(inner.page_size)
        if sink < 0 or window < 0:
            raise ValueError(f"sink and window must be >= 0, got {sink}, {window}")
        self.inner, self.sink, self.window = inner, sink, window
        self.name = f"{inner.name}+sink{sink}+window{window}"

    def set_merge(self, merge: str) -> SelectionPolicy:
        self.inner.set_merge(merge)
        return super().set_merge(merge)

    def build(self, keys: np.ndarray) -> None:
        self.n = keys.shape[1]
        self.H = keys.shape[0]
        self.lo, self.hi = min(self.sink, self.n), max(self.n - self.window, min(self.sink, self.n))
        self.has_middle = self.hi > self.lo
        if self.has_middle:
            self.inner.build(np.ascontiguousarray(keys[:, self.lo : self.hi]))

    def select(self, queries: np.ndarray, budget: int) -> list[np.ndarray]:
        budget = self.check_budget(budget)
        fixed = np.concatenate([np.arange(self.lo), np.arange(self.hi, self.n)])
        rest = budget - fixed.size
        if rest < 1 or not self.has_middle:
            return [fixed[:budget] for _ in range(self.H)]
        inner = self.inner.select(queries, rest)
        return [np.concatenate([np.arange(self.lo), sel + self.lo, np.arange(self.hi, self.n)]) for sel in inner]
