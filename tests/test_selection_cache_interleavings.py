"""``SelectionCache`` (runtime/selection_cache.py) under random interleavings of what a real server cannot
order on demand: when a layer's query copy lands on the host, when the indexer's answers arrive, when
requests start and stop decoding sparsely, and when Inserts move their index ends. The selector is a stand-in
(a real indexer answers in its own time; these orders cannot be forced through it), recording each request's
index end when a query is sent, as the indexer's in-order connection makes it; every selection the cache
hands out must carry that end, be no older than the bound, and its bookkeeping must stay consistent.
"""

from __future__ import annotations

import random

import numpy as np

from icecache_sglang.indexer.client import Selection
from icecache_sglang.runtime.metrics import IceCacheMetrics
from icecache_sglang.runtime.selection import SentQuery, StepSelection
from icecache_sglang.runtime.selection_cache import SelectionCache

FALLBACK = -5


class LandingQuery:
    """A layer's queries whose copy to the host lands at a random moment (or when read)."""

    q_dtype = None

    def __init__(self, rng: random.Random, n: int):
        self.rng, self.n, self.landed = rng, n, False

    def ready(self) -> bool:
        self.landed = self.landed or self.rng.random() < 0.3
        return self.landed

    def array(self) -> np.ndarray:
        self.landed = True
        return np.zeros((self.n, 2, 4), np.float32)


class RecordingSelector:
    """Answers each query with the index ends its requests had when it was sent (written into the slots),
    some at once, others later; answers at most ``max_batch`` requests per message."""

    max_batch = 2

    def __init__(self, rng: random.Random, ends: dict[int, int]):
        self.rng, self.ends, self.pending, self.rid = rng, ends, {}, 0

    def send(self, step, layer, seqs, q, q_dtype, n_pages, **query):
        assert len(seqs) <= self.max_batch and q.shape[0] == len(seqs)
        self.rid += 1
        self.pending[self.rid] = ([self.ends[s] for s in seqs], self.rng.random() < 0.5)
        return [SentQuery(self.rid, layer, list(seqs), n_pages)]

    def ready(self, sent) -> bool:
        return sent.rid is None or self.pending[sent.rid][1] or self.rng.random() < 0.3

    def receive(self, step, sent, used=True) -> Selection:
        if sent.rid is None:
            n = len(sent.seqs)
            return Selection(np.zeros((n, 1, 1), np.int32), np.full((n, 1, 1), FALLBACK, np.int32), [0] * n, True,
                             "fallback", 0)
        ends, _ = self.pending.pop(sent.rid)
        slots = np.array([[[e]] for e in ends], np.int32)
        return Selection(np.zeros_like(slots), slots, [0] * len(ends), False, "", 0)

    def drop(self, sent) -> None:
        if sent.rid is not None:
            self.pending.pop(sent.rid, None)


def test_selections_carry_the_index_end_they_were_made_against_under_any_interleaving():
    rng = random.Random(1)
    for _ in range(300):
        ends: dict[int, int] = {}
        live: set[int] = set()
        selector = RecordingSelector(rng, ends)
        cache = SelectionCache(selector, IceCacheMetrics(), 1, lambda seqs: [ends.get(s) for s in seqs])
        next_seq = 1
        for _ in range(60):
            for s in list(live):  # requests finish
                if rng.random() < 0.05:
                    live.discard(s)
                    ends.pop(s)
            while len(live) < 5 and rng.random() < 0.5:  # and start
                live.add(next_seq)
                ends[next_seq] = 10
                next_seq += 1
            cache.new_step(set(live))
            for s in live:  # this step's Inserts
                if rng.random() < 0.5:
                    ends[s] += 1
            seqs = sorted(s for s in live if rng.random() < 0.9)
            if not seqs:
                continue
            step = StepSelection(1e18)
            max_stale = rng.choice([0, 1, 2, 3, 4])
            for layer in (0, 1):
                out = cache.choose(step, layer, seqs, [ends[s] for s in seqs], LandingQuery(rng, len(seqs)), 1,
                                   step_reuse=rng.choice([1, 2, 3]) if not max_stale else 1, max_stale=max_stale,
                                   deadline_s=0.1)
                for (slots, end), s in zip(out, seqs):
                    if slots.ravel()[0] == FALLBACK:
                        continue
                    assert int(slots.ravel()[0]) == end  # the end the answer was made against
                    assert not max_stale or cache.step - cache.entries[(s, layer)].step <= max_stale
            unsent = [f for msgs in cache.messages.values() for f in msgs if f.sent is None]
            assert len(cache.unsent) == len(unsent) and all(f in unsent for f in cache.unsent)
            for (s, layer), f in cache.latest.items():
                assert f in cache.messages.get(layer, []) and s in f.seqs
        cache.clear()
        assert not cache.unsent and not cache.latest and not any(cache.messages.values())
