"""StreamingLLM: attention sinks (the first tokens) plus the most recent window; ignores the query."""

from __future__ import annotations

import numpy as np

from .base import SelectionPolicy


class StreamingPolicy(SelectionPolicy):
    name = "streaming"

    def __init__(self, page_size: int = 16, sink_tokens: int = 4):
        super().__init__(page_size)
        if not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be a non-negative int, got {sink_tokens!r}")
        self.sink_tokens = sink_tokens

    def build(self, keys: np.ndarray) -> None:
        self.H, self.n = keys.shape[0], keys.shape[1]

    def select(self, queries: np.ndarray, budget: int) -> list[np.ndarray]:
        budget = min(self.check_budget(budget), self.n)
        sink = min(self.sink_tokens, budget)
        toks = np.unique(np.concatenate([np.arange(sink), np.arange(self.n - (budget - sink), self.n)]))
        return [toks for _ in range(self.H)]
