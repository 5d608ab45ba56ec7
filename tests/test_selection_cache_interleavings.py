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


class ScriptedSelector:
    """Answers every message at once: normally (each request's slots hold its sequence id) or, when
    ``fail_next`` is set, with a fallback for the whole message (a deadline passed, the indexer erred)."""

    max_batch = 64

    def __init__(self):
        self.fail_next, self.rid, self.sent = False, 0, {}
        self.answered = True  # False: answers have not arrived yet (a wait still gets them)

    def send(self, step, layer, seqs, q, q_dtype, n_pages, **query):
        self.rid += 1
        self.sent[self.rid] = (list(seqs), self.fail_next)
        return [SentQuery(self.rid, layer, list(seqs), n_pages)]

    def ready(self, sent) -> bool:
        return self.answered

    def receive(self, step, sent, used=True) -> Selection:
        seqs, fail = self.sent.pop(sent.rid)
        slots = np.array([[[FALLBACK if fail else s]] for s in seqs], np.int32)
        return Selection(np.zeros_like(slots), slots, [0] * len(seqs), fail, "deadline" * fail, 0)

    def drop(self, sent) -> None:
        self.sent.pop(sent.rid, None)


def test_a_message_that_falls_back_keeps_the_fresh_selections_of_its_other_requests():
    """Asynchronous mode packs every request's query of a layer into one message. When a request without a
    usable selection (its first sparse step) waits for that message and it falls back, only that request
    takes the fallback: the others attend with their own selections, still within the bound (they took the
    message's fallback: recent pages instead of their selections, for every request of the batch)."""
    selector = ScriptedSelector()
    ends = {1: 10, 2: 10}
    cache = SelectionCache(selector, IceCacheMetrics(), 1, lambda seqs: [ends.get(s) for s in seqs])
    kw = dict(step_reuse=1, max_stale=2, deadline_s=0.1)
    cache.new_step({1})
    (slots, _), = cache.choose(StepSelection(1e18), 0, [1], [10], LandingQuery(random.Random(0), 1), 1, **kw)
    assert int(slots.ravel()[0]) == 1
    cache.new_step({1, 2})
    selector.fail_next = True  # request 2's first query, in one message with request 1's refresh, falls back
    out = cache.choose(StepSelection(1e18), 0, [1, 2], [10, 10], LandingQuery(random.Random(0), 2), 1, **kw)
    assert [int(s.ravel()[0]) for s, _ in out] == [1, FALLBACK]


def test_a_new_turn_forgets_the_selections_and_answers_made_for_the_context_before():
    """A streaming session's next turn extends a live sequence's index with a whole prompt: a selection made
    before (still within the bound by steps) would attend its old pages and every token of the new prompt in
    full. After ``forget`` the sequence selects anew, and an answer to a query sent before is not installed."""
    selector = ScriptedSelector()
    ends = {1: 10}
    cache = SelectionCache(selector, IceCacheMetrics(), 1, lambda seqs: [ends.get(s) for s in seqs])
    kw = dict(step_reuse=1, max_stale=4, deadline_s=0.1)
    cache.new_step({1})
    cache.choose(StepSelection(1e18), 0, [1], [10], LandingQuery(random.Random(0), 1), 1, **kw)
    cache.new_step({1})
    cache.choose(StepSelection(1e18), 0, [1], [10], LandingQuery(random.Random(0), 1), 1, **kw)  # a refresh in flight
    assert cache.in_flight() == 1 and cache.entries[(1, 0)].end == 10
    ends[1] = 2000  # the next turn's prompt is indexed
    cache.forget(1)
    assert (1, 0) not in cache.entries
    cache.new_step({1})
    (slots, end), = cache.choose(StepSelection(1e18), 0, [1], [2000], LandingQuery(random.Random(0), 1), 1, **kw)
    assert end == 2000  # made against the new index, waited for: not the old turn's selection (end 10)
    assert cache.entries[(1, 0)].end == 2000 and cache.in_flight() == 0  # the old refresh was not installed


def test_an_answer_read_late_because_its_layer_was_not_visited_is_not_a_lagging_indexer():
    """The indexer answered a query at once, but no step visited its layer for a few steps (every row decoded
    densely, or was held): the answer is read late, and that must not space out the queries as if the
    indexer had fallen behind (it was taken for one for ``BEHIND_MEMORY_STEPS`` steps)."""
    landed = LandingQuery(random.Random(0), 1)
    landed.landed = True  # each query goes out at once
    selector = ScriptedSelector()
    cache = SelectionCache(selector, IceCacheMetrics(), 1, lambda seqs: [10 for _ in seqs])
    kw = dict(step_reuse=1, max_stale=4, deadline_s=0.1)
    cache.new_step({1})
    cache.choose(StepSelection(1e18), 0, [1], [10], landed, 1, **kw)  # the first selection
    cache.new_step({1})
    selector.answered = False  # a refresh sent and not waited for, answered after the layer ran
    cache.choose(StepSelection(1e18), 0, [1], [10], landed, 1, **kw)
    assert cache.in_flight() == 1
    selector.answered = True
    for _ in range(3):  # steps that do not reach layer 0
        cache.new_step({1})
    cache.choose(StepSelection(1e18), 0, [1], [10], landed, 1, **kw)
    assert cache.behind_until < cache.step  # not taken for a lagging indexer
