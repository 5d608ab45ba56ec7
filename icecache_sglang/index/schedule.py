"""The deterministic level schedule of M-DCI (index-spec section 3.1, [MD] ``random=False``)."""

from __future__ import annotations

import functools
import math

import numpy as np


def _ceil_inv(p: float) -> int:
    return math.ceil(1.0 / p - 1e-9)


class LevelSchedule:
    """Assigns each token, in insertion order, a level; state persists across ``assign`` calls.

    Level 0 takes about ``1 - p0`` of the tokens; each level above takes about ``p_up`` of the one
    below. The number of levels is unbounded.
    """

    def __init__(self, p0: float, p_up: float) -> None:
        self.p0 = p0
        self.p_up = p_up
        self.counts: list[int] = []
        self.next_level = 0

    def assign(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int32)
        counts, nxt = self.counts, self.next_level
        for i in range(n):
            lv = nxt
            p = self.p0 if lv == 0 else self.p_up
            if lv == len(counts):
                counts.append(0)
                nxt = 0
            elif lv == len(counts) - 1:
                nxt = lv + 1 if counts[lv] + 1 == _ceil_inv(p) else 0
            else:
                nxt = lv + 1 if counts[lv] + 1 >= counts[lv + 1] / p else 0
            counts[lv] += 1
            out[i] = lv
        self.next_level = nxt
        return out


def schedule_levels(n: int, p0: float, p_up: float) -> np.ndarray:
    """Levels of ``n`` tokens under a fresh schedule (what a bulk build uses). The schedule is a Python loop
    over the tokens and every layer of a prompt asks for the same one, so it is computed once per size."""
    return _cached_levels(int(n), float(p0), float(p_up)).copy()


@functools.lru_cache(maxsize=16)
def _cached_levels(n: int, p0: float, p_up: float) -> np.ndarray:
    return LevelSchedule(p0, p_up).assign(n)
