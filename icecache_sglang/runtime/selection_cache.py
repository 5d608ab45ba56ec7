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
  On a GPU a query nobody waits for goes out once its copy to the host has landed (``host_query.py``):
  checked at every anchor layer and step, waited for only when its selection is due or two steps later.
  Its index end is taken when it is sent, not when its layer ran: an index write of the request sent in
  between is answered before it, and its pages may hold those tokens.
  **An indexer that falls behind is asked less often**: once an answer is seen missing in a step after the
  one its query went out in (the indexer did not answer within that step; an answer read late because no
  step visited its layer in between does not count), for ``BEHIND_MEMORY_STEPS``
  steps a request's layer sends a new query only every ``refresh = ceil(k / 2)`` steps (each layer on its
  own steps, so the load spreads), or when its selection is ``refresh`` or more steps old. A query then
  waits at most about ``refresh`` steps in the indexer's queue, and its answer is used within the bound
  instead of the step waiting for it (on the H100, 128k tokens: the exact scan of 30 layers took longer
  than a step, and every few steps one waited 150-400 ms for a selection past the bound).

Entries and queries in flight of requests that stopped decoding sparsely are dropped at the next step.
A fallback (the indexer did not answer in time) serves its step only, and only the requests that waited for
it (one without a selection within the bound); it is never reused. A request whose index took a new turn's
prompt (a streaming session's next turn on the same row) forgets its selections and queries in flight
(:meth:`SelectionCache.forget`): they were made for the previous turn's context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..indexer.client import Selection
from .host_query import HostQuery
from .metrics import IceCacheMetrics
from .selection import SentQuery, Selector, StepSelection

#: an unsent query is waited for (its copy to the host) once this many steps old
SEND_BY_STEPS = 2
#: how long an answer that arrived two or more steps after its query keeps the queries spaced out
BEHIND_MEMORY_STEPS = 8


@dataclass
class CachedSelection:
    slots: np.ndarray  # [H_kv, n_pages * page_size] key-store slots of the selected pages (-1 padded)
    end: int  # positions before this were indexed when it was made: the plan attends to [end, seq_len) in full
    step: int  # the step whose query made it
    n_pages: int


@dataclass(eq=False)  # compared by identity (a message is one object)
class _InFlight:
    """One query message (at most ``max_batch`` requests) of one anchor layer: ``sent`` once it went out,
    with ``ends``, its requests' index ends at that moment; until then, what sending it takes (``q``: the
    layer's queries, possibly still on their way to the host, of which rows ``rows`` are this message's)."""

    layer: int
    seqs: list[int]
    step: int
    n_pages: int
    sent: SentQuery | None = None
    ends: list[int] = field(default_factory=list)
    q: HostQuery | None = None
    rows: np.ndarray | None = None
    selection: StepSelection | None = None  # the step it was asked in (its deadline, or None: not serving)
    send_args: dict | None = None  # the query's parameters and expiry
    sent_step: int = 0  # the step it went out in
    pending_at: int = -1  # the last step it was seen unanswered in (a step's start counts for the step before)


class SelectionCache:
    """``indexed_ends(seqs)``: each sequence's index end now (None: it no longer decodes sparsely), read
    when a query is sent."""

    def __init__(self, selector: Selector, metrics: IceCacheMetrics, num_kv_heads: int,
                 indexed_ends: Callable[[list[int]], list[int | None]]):
        self.selector, self.metrics, self.H = selector, metrics, num_kv_heads
        self.indexed_ends = indexed_ends
        self.entries: dict[tuple[int, int], CachedSelection] = {}  # (seq, indexer layer) -> latest answered
        self.latest: dict[tuple[int, int], _InFlight] = {}  # (seq, indexer layer) -> its newest query in flight
        self.messages: dict[int, list[_InFlight]] = {}  # indexer layer -> every query message in flight there
        self.unsent: list[_InFlight] = []  # messages whose queries are still on their way to the host
        self.step = 0
        self.behind_until = 0  # asynchronous queries are spaced out until this step (the indexer lagged)
        self.max_stale = 0  # the bound of the last asynchronous choice (an older unsent query is dropped)
        self.forgotten: dict[int, int] = {}  # seq -> the first step whose queries count again (``forget``)

    def new_step(self, live: set[int]) -> None:
        """A decode forward pass begins (every one counts, dense ones too: ages are in decode steps) with
        requests ``live`` indexed: forget every other request's selections and queries (a finished
        request's answers would never be read), and send the queries that have reached the host (those
        ``SEND_BY_STEPS`` steps old, waiting for them)."""
        self.step += 1
        if not (self.entries or self.latest or any(self.messages.values())):
            return
        for key in [k for k in self.entries if k[0] not in live]:
            del self.entries[key]
        for key in [k for k in self.latest if k[0] not in live]:
            del self.latest[key]
        for seq in [s for s, first in self.forgotten.items() if s not in live or not self._asked_before(s, first)]:
            del self.forgotten[seq]
        for layer, msgs in self.messages.items():
            keep = []
            for f in msgs:
                if live.isdisjoint(f.seqs):
                    self._drop(f)
                else:
                    keep.append(f)
            self.messages[layer] = keep
        self.unsent = [f for f in self.unsent if not live.isdisjoint(f.seqs)]
        self._note_answers()
        self.send_ready(oldest=self.step - SEND_BY_STEPS)

    def _note_answers(self) -> None:
        """At a step's start: which messages in flight the indexer has not answered through the step before
        (answers are read when their layer is next visited, maybe steps later: a dense step visits none; an
        answer is late only if it was seen missing in the step after the one it went out in). Only messages
        sent two or more steps ago and not seen in the step before are asked: for the others it decides nothing."""
        for msgs in self.messages.values():
            for f in msgs:
                if f.sent is not None and f.sent.rid is not None and f.sent_step < self.step - 1 \
                        and f.pending_at < self.step - 1 and not self.selector.ready(f.sent):
                    f.pending_at = self.step - 1

    def send_ready(self, oldest: int | None = None) -> None:
        """Send the unsent messages whose queries have reached the host, and those of step ``oldest`` or
        earlier (waiting for their copy). One nobody can use any more is dropped unsent: every request of
        it has a newer query, or its answer would be more than ``max_stale`` steps old."""
        if not self.unsent:
            return
        left = []
        for f in self.unsent:
            if not self._wanted(f):
                self._forget(f)
            elif f.q.ready() or (oldest is not None and f.step <= oldest):
                self._send(f)
            else:
                left.append(f)
        self.unsent = left

    def _wanted(self, f: _InFlight) -> bool:
        return (not self.max_stale or self.step - f.step <= self.max_stale) and any(
            self.latest.get((s, f.layer)) is f for s in f.seqs)

    def _forget(self, f: _InFlight) -> None:
        """Take an unsent message out of the layer's messages (and its requests' newest query)."""
        msgs = self.messages.get(f.layer, [])
        if f in msgs:
            msgs.remove(f)
        for s in f.seqs:
            if self.latest.get((s, f.layer)) is f:
                del self.latest[(s, f.layer)]

    def _send(self, f: _InFlight) -> None:
        """Send ``f`` (waiting for its queries' copy to the host), its requests' index ends read now."""
        ends = self.indexed_ends(f.seqs)
        keep = [j for j, e in enumerate(ends) if e is not None]
        seqs = [f.seqs[j] for j in keep]
        sent = (self.selector.send(f.selection, f.layer, seqs, f.q.array()[f.rows[keep]], f.q.q_dtype, f.n_pages,
                                   **f.send_args) if seqs else [SentQuery(None, f.layer, [], f.n_pages)])
        for j, s in enumerate(f.seqs):  # a request that stopped decoding sparsely meanwhile is not asked for
            if ends[j] is None and self.latest.get((s, f.layer)) is f:
                del self.latest[(s, f.layer)]
        (f.sent,) = sent
        f.sent_step = self.step
        f.pending_at = self.step - 1
        f.seqs, f.ends = seqs, [ends[j] for j in keep]
        f.q = f.rows = f.selection = f.send_args = None

    def _drop(self, f: _InFlight) -> None:
        if f.sent is not None:
            self.selector.drop(f.sent)

    def forget(self, seq: int) -> None:
        """``seq``'s index took more than a decode step's tokens (a new turn's prompt): its selections, and the
        answers of its queries in flight, belong to the context before; from the next step it selects anew."""
        for key in [k for k in self.entries if k[0] == seq]:
            del self.entries[key]
        for key in [k for k in self.latest if k[0] == seq]:
            del self.latest[key]
        if self._asked_before(seq, self.step + 1):  # answers to queries of earlier steps are not installed
            self.forgotten[seq] = self.step + 1

    def clear(self) -> None:
        for msgs in self.messages.values():
            for f in msgs:
                self._drop(f)
        self.messages.clear()
        self.unsent.clear()
        self.latest.clear()
        self.entries.clear()
        self.forgotten.clear()
        self.behind_until = 0

    def collect_arrived(self) -> None:
        """Install the answers that have arrived, at every layer, without waiting (a step deciding which
        requests have selections)."""
        idle = StepSelection(None)
        for layer in list(self.messages):
            self._collect(idle, layer, must=set())

    def selected_at(self, seq: int, layers: list[int], n_pages: int) -> bool:
        """Whether ``seq`` has a selection of ``n_pages`` pages at every one of ``layers``."""
        for layer in layers:
            e = self.entries.get((seq, layer))
            if e is None or e.n_pages != n_pages:
                return False
        return True

    def selected_seqs(self) -> set[int]:
        """The requests holding an answered selection at some anchor layer."""
        return {s for s, _ in self.entries}

    def in_flight(self) -> int:
        return sum(len(m) for m in self.messages.values())

    def choose(self, step: StepSelection, layer: int, seqs: list[int], ends: list[int], q: HostQuery,
               n_pages: int, *, step_reuse: int, max_stale: int, deadline_s: float,
               **query) -> list[tuple[np.ndarray, int]]:
        """Per request of ``seqs`` (indexed ends ``ends`` now, queries ``q``): the slots of the pages to attend
        at indexer layer ``layer`` and the position from which it attends every token. ``deadline_s``: the
        selection deadline; an asynchronous query expires ``max_stale`` deadlines after the step's (past
        that it is too old to be used), so a slow indexer skips queries nobody can use instead of
        queueing them. A query nobody waits for in this layer goes out once ``q`` is on the host."""
        now = self._layer_begins(step, layer, max_stale)
        send, need = [], []
        refresh = (max_stale + 1) // 2
        spaced = max_stale and now < self.behind_until and refresh > 1
        for j, s in enumerate(seqs):
            e = self.entries.get((s, layer))
            age = now - e.step if e is not None and e.n_pages == n_pages else None
            if max_stale:
                f = self.latest.get((s, layer))
                fresh_enough = self._fresh(f, max_stale, n_pages)
                if f is None and spaced and age is not None and age < refresh and (now + layer) % refresh:
                    self.metrics.queries_spaced += 1  # the indexer is behind: not this layer's step to ask
                elif f is None or (not fresh_enough and (age is None or age > max_stale)):
                    send.append(j)  # nothing in flight, or what is in flight would be too old to wait for
                if age is None or age > max_stale:
                    need.append(j)
            elif age is None or age >= step_reuse:
                send.append(j)
                need.append(j)
        need = set(need)
        if send:
            self._ask(step, layer, seqs, send, need, q, n_pages, max_stale, deadline_s, query)
        fallback = self._collect(step, layer, must={id(self.latest[(seqs[j], layer)]) for j in need})
        out = []
        for j, s in enumerate(seqs):
            # a waited-for message that fell back serves the requests that needed it; the others of the message
            # (asked to refresh, their selections still within the bound) attend with those
            if s in fallback and j in need:
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

    def prime(self, step: StepSelection, layer: int, seqs: list[int], q: HostQuery, n_pages: int, *,
              max_stale: int, deadline_s: float, **query) -> None:
        """Ask for the selections of ``seqs`` at ``layer`` without waiting: requests that decode densely until
        their first selections are in (a step that would wait for them instead waited for every anchor
        layer's answer in turn). Each gets one query in flight; their answers are installed by later steps."""
        self._layer_begins(step, layer, max_stale)
        send = [j for j, s in enumerate(seqs) if not self._fresh(self.latest.get((s, layer)), max_stale, n_pages)]
        if send:
            self._ask(step, layer, seqs, send, set(), q, n_pages, max_stale, deadline_s, query)

    def _layer_begins(self, step: StepSelection, layer: int, max_stale: int) -> int:
        """An anchor layer's first work: send what has reached the host, install what has arrived at
        ``layer``; returns the step number."""
        self.max_stale = max_stale
        self.send_ready()
        self._collect(step, layer, must=set())
        return self.step

    def _fresh(self, f: _InFlight | None, max_stale: int, n_pages: int) -> bool:
        """Whether the query in flight ``f`` is one to wait for: at most ``max_stale`` steps old, same pages."""
        return f is not None and self.step - f.step <= max_stale and f.n_pages == n_pages

    def _ask(self, step: StepSelection, layer: int, seqs: list[int], send: list[int], waited: set[int],
             q: HostQuery, n_pages: int, max_stale: int, deadline_s: float, query: dict) -> None:
        """Queries for ``seqs[j]``, ``j`` in ``send``, one message per ``max_batch`` requests: sent now when
        ``q`` is on the host or a request of the message is ``waited`` for, else once it lands."""
        now = self.step
        expires_at = None if step.deadline is None else step.deadline + max_stale * deadline_s
        limit = self.selector.max_batch
        for i in range(0, len(send), limit):
            rows = np.asarray(send[i: i + limit])
            f = _InFlight(layer, [seqs[j] for j in rows], now, n_pages, q=q, rows=rows, selection=step,
                          send_args=dict(expires_at=expires_at, **query))
            self.messages.setdefault(layer, []).append(f)
            for s in f.seqs:
                self.latest[(s, layer)] = f
            if q.ready() or waited.intersection(rows.tolist()):
                self._send(f)
            else:
                self.unsent.append(f)
                self.metrics.queries_deferred += 1

    def _collect(self, step: StepSelection, layer: int, must: set[int]) -> dict[int, np.ndarray]:
        """Install the answers at ``layer`` that have arrived, and wait (until the step's deadline) for the
        messages in ``must`` (ids; one not sent yet goes out first). Returns the fallback slots of requests
        whose waited-for message fell back."""
        fallback: dict[int, np.ndarray] = {}
        keep = []
        for f in self.messages.get(layer, []):
            waited = id(f) in must
            if not f.seqs:  # every request it asked for stopped decoding sparsely before it went out
                continue
            if f.sent is None:
                if not waited:
                    keep.append(f)
                    continue
                self._send(f)
                self.unsent.remove(f)
            if not self.selector.ready(f.sent):
                f.pending_at = self.step
                if not waited:
                    keep.append(f)
                    continue
            sel = self.selector.receive(step, f.sent, used=waited)
            if f.sent.rid is not None and f.pending_at > f.sent_step:  # not answered (or expired unanswered)
                self.behind_until = self.step + BEHIND_MEMORY_STEPS  # within the step it went out in
            for s in f.seqs:
                if self.latest.get((s, layer)) is f:
                    del self.latest[(s, layer)]
            self._install(f, sel, layer, fallback if waited else None)
        self.messages[layer] = keep
        return fallback

    def _asked_before(self, seq: int, step: int) -> bool:
        """Whether a query of ``seq`` made before ``step`` is still in flight."""
        return any(f.step < step and seq in f.seqs for msgs in self.messages.values() for f in msgs)

    def _install(self, f: _InFlight, sel: Selection, layer: int, fallback: dict | None) -> None:
        for j, s in enumerate(f.seqs):
            if f.step < self.forgotten.get(s, 0):  # made for the context before a new turn (``forget``)
                continue
            slots = sel.slots[j].reshape(self.H, -1).astype(np.int64)
            if sel.fallback:  # serves this step only
                if fallback is not None:
                    fallback[s] = slots
                continue
            old = self.entries.get((s, layer))
            if old is None or old.step <= f.step:
                self.entries[(s, layer)] = CachedSelection(slots, f.ends[j], f.step, f.n_pages)
