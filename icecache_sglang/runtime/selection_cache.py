"""Selections reused across decode steps: ``step_reuse`` (synchronous every k steps) and ``max_stale_steps``
(asynchronous), per (request, anchor layer).

A selection is a request's pages at one anchor layer, as key-store slots, plus the index end it was made
against: positions ``[sink, end)`` were indexed when the indexer answered it (writes and queries travel
in order on one connection, so that is the request's indexed end when the query was sent). A plan built
from it attends to the sink, its pages, and every token from ``end`` on: tokens indexed after the
selection are attended in full instead of being missed, so no window-versus-staleness rule is needed.

* ``step_reuse: k``: a request's anchor layer is selected (sent and waited for, under the step's deadline)
  when its selection is k or more steps old, and reused otherwise. ``k = 1`` is the synchronous mode.
* ``max_stale_steps: k``: at every step each anchor layer sends a query for every request that has none in
  flight there, and does not wait for it. The step attends with the freshest selection already answered;
  when that is more than k steps old (or there is none: a request's first sparse step) it waits for the
  request's query in flight, within the step's deadline. A slow indexer makes selections older, up to the
  bound, and only then costs waiting; a dead one costs fallbacks, as in the synchronous mode.

Entries and queries in flight of requests that stopped decoding sparsely are dropped at the next step.
A fallback (the indexer did not answer in time) serves its step only and is never reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..indexer.client import Selection
from .metrics import IceCacheMetrics
from .selection import SentQuery, Selector, StepSelection


@dataclass
class CachedSelection:
    slots: np.ndarray  # [H_kv, n_pages * page_size] key-store slots of the selected pages (-1 padded)
    end: int  # positions before this were indexed when it was made: the plan attends to [end, seq_len) in full
    step: int  # the step whose query made it
    n_pages: int


@dataclass
class _InFlight:
    sent: SentQuery
    ends: list[int]
    step: int


class SelectionCache:
    def __init__(self, selector: Selector, metrics: IceCacheMetrics, num_kv_heads: int):
        self.selector, self.metrics, self.H = selector, metrics, num_kv_heads
        self.entries: dict[tuple[int, int], CachedSelection] = {}  # (seq, indexer layer) -> latest answered
        self.latest: dict[tuple[int, int], _InFlight] = {}  # (seq, indexer layer) -> its newest query in flight
        self.messages: dict[int, list[_InFlight]] = {}  # indexer layer -> every query message in flight there
        self.step = 0

    def new_step(self, live: set[int]) -> None:
        """A decode forward pass begins (every one counts, dense ones too: ages are in decode steps) with
        requests ``live`` indexed: forget every other request's selections and queries (a finished
        request's answers would never be read)."""
        self.step += 1
        if not (self.entries or self.latest or any(self.messages.values())):
            return
        for key in [k for k in self.entries if k[0] not in live]:
            del self.entries[key]
        for key in [k for k in self.latest if k[0] not in live]:
            del self.latest[key]
        for layer, msgs in self.messages.items():
            keep = []
            for f in msgs:
                if live.isdisjoint(f.sent.seqs):
                    self.selector.drop(f.sent)
                else:
                    keep.append(f)
            self.messages[layer] = keep

    def clear(self) -> None:
        for msgs in self.messages.values():
            for f in msgs:
                self.selector.drop(f.sent)
        self.messages.clear()
        self.latest.clear()
        self.entries.clear()

    def selected_seqs(self) -> set[int]:
        """The requests holding an answered selection at some anchor layer."""
        return {s for s, _ in self.entries}

    def in_flight(self) -> int:
        return sum(len(m) for m in self.messages.values())

    def choose(self, step: StepSelection, layer: int, seqs: list[int], ends: list[int], q: np.ndarray,
               q_dtype: str | None, n_pages: int, *, step_reuse: int, max_stale: int, deadline_s: float,
               **query) -> list[tuple[np.ndarray, int]]:
        """Per request of ``seqs`` (indexed ends ``ends`` now, queries ``q``): the slots of the pages to attend
        at indexer layer ``layer`` and the position from which it attends every token. ``deadline_s``: the
        selection deadline; an asynchronous query expires ``max_stale`` deadlines after the step's (past
        that it is too old to be used), so a slow indexer skips queries nobody can use instead of
        queueing them."""
        now = self.step
        self._collect(step, layer, must=set())
        send, need = [], []
        for j, s in enumerate(seqs):
            e = self.entries.get((s, layer))
            age = now - e.step if e is not None and e.n_pages == n_pages else None
            if max_stale:
                f = self.latest.get((s, layer))
                fresh_enough = f is not None and now - f.step <= max_stale and f.sent.n_pages == n_pages
                if f is None or (not fresh_enough and (age is None or age > max_stale)):
                    send.append(j)  # nothing in flight, or what is in flight would be too old to wait for
                if age is None or age > max_stale:
                    need.append(j)
            elif age is None or age >= step_reuse:
                send.append(j)
                need.append(j)
        if send:
            idx = np.asarray(send)
            end_of = dict(zip(seqs, ends))
            expires_at = None if step.deadline is None else step.deadline + max_stale * deadline_s
            for sent in self.selector.send(step, layer, [seqs[j] for j in send], q[idx], q_dtype, n_pages,
                                           expires_at=expires_at, **query):
                f = _InFlight(sent, [end_of[s] for s in sent.seqs], now)
                self.messages.setdefault(layer, []).append(f)
                for s in sent.seqs:
                    self.latest[(s, layer)] = f
        fallback = self._collect(step, layer, must={id(self.latest[(seqs[j], layer)]) for j in need})
        out = []
        for j, s in enumerate(seqs):
            if s in fallback:
                out.append((fallback[s], ends[j]))
                continue
            e = self.entries[(s, layer)]
            age = now - e.step
            if age:
                self.metrics.reused_selections += 1
                self.metrics.selection_age_steps_total += age
                self.metrics.selection_age_steps_max = max(self.metrics.selection_age_steps_max, age)
            out.append((e.slots, e.end))
        return out

    def _collect(self, step: StepSelection, layer: int, must: set[int]) -> dict[int, np.ndarray]:
        """Install the answers at ``layer`` that have arrived, and wait (until the step's deadline) for the
        messages in ``must`` (ids). Returns the fallback slots of requests whose waited-for message fell back."""
        fallback: dict[int, np.ndarray] = {}
        keep = []
        for f in self.messages.get(layer, []):
            waited = id(f) in must
            if not waited and not self.selector.ready(f.sent):
                keep.append(f)
                continue
            sel = self.selector.receive(step, f.sent, used=waited)
            for s in f.sent.seqs:
                if self.latest.get((s, layer)) is f:
                    del self.latest[(s, layer)]
            self._install(f, sel, layer, fallback if waited else None)
        self.messages[layer] = keep
        return fallback

    def _install(self, f: _InFlight, sel: Selection, layer: int, fallback: dict | None) -> None:
        for j, s in enumerate(f.sent.seqs):
            slots = sel.slots[j].reshape(self.H, -1).astype(np.int64)
            if sel.fallback:  # serves this step only
                if fallback is not None:
                    fallback[s] = slots
                continue
            old = self.entries.get((s, layer))
            if old is None or old.step <= f.step:
                self.entries[(s, layer)] = CachedSelection(slots, f.ends[j], f.step, f.sent.n_pages)
