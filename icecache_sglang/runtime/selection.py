"""Page selection for one decode step: every query of the step shares **one deadline**.

A decode step asks the indexer once per anchor layer (and per 64-request chunk). Each answer is waited
for only until the step's deadline: ``selection_deadline_ms`` after the step began, plus an allowance for
the index writes sent since the last step (a long prefill's build is queued ahead of the first queries).
Once the deadline has passed, the step's remaining queries take whatever has already arrived, else a
fallback (each request's most recent indexed pages), so a silent indexer costs a step at most one
deadline, not one per layer. Queries carry the deadline (``expires_at``), so an indexer that wakes up
late skips the ones nobody waits for any more.

While the supervisor says the indexer is not serving (restarting, rebuilding, down), nothing is waited
for: selections fall back at once. With ``while_indexing: dense`` a step whose queries would queue behind
unanswered writes does not select at all (``Planner.begin`` attends to every token); ``behind`` keeps the
supervisor's stuck detection going meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ..index.config import DEFAULT_GQA_MERGE
from ..indexer.client import IndexerError, IndexerTimeout, Selection
from .supervisor import IndexerSupervisor

logger = logging.getLogger(__name__)

#: how long indexing one token of one KV head of one layer may take before a decode step stops waiting for
#: it (a 128k-token build of 8 heads takes ~14 s on 2 cores: ~14 us per token-head; twice that, here)
BUILD_S_PER_TOKEN_HEAD = 30e-6


@dataclass
class SentQuery:
    """One query message in flight: its id (None when the indexer was not serving: a fallback), indexer
    layer, sequences and pages per KV head asked for."""

    rid: int | None
    layer: int
    seqs: list[int]
    n_pages: int


class StepSelection:
    """One decode step's selection state: its deadline (None: not waiting at all), whether it passed,
    the time spent waiting and the pages selected."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline
        self.timed_out = False
        self.wait_s = 0.0  # waiting for selections
        self.write_wait_s = 0.0  # waiting for index writes before the step's queries (a new request's build)
        self.pages = 0  # pages the step's plans attend (counted by Planner.plan, reused selections included)

    def left(self) -> float:
        return 0.0 if self.deadline is None else max(0.0, self.deadline - time.monotonic())


class Selector:
    """Issues a step's queries through the supervised indexer's client and assembles the selections."""

    def __init__(self, supervisor: IndexerSupervisor, num_kv_heads: int, num_indexed_layers: int, metrics):
        self.sup = supervisor
        self.H = num_kv_heads
        self.L = num_indexed_layers
        self.metrics = metrics
        self._behind_since: float | None = None  # while whole steps attend densely: since when

    @property
    def max_batch(self) -> int:
        """Requests one indexer query carries at most."""
        return self.sup.indexer.config.max_batch

    def _allowance(self, tokens: int) -> float:
        """Extra seconds index writes carrying ``tokens`` tokens may take (every KV head and layer)."""
        return tokens * self.H * self.L * BUILD_S_PER_TOKEN_HEAD

    def behind(self, deadline_s: float, pending_tokens: int) -> None:
        """A step whose every row attends densely because the indexer is behind on it (``while_indexing:
        dense``). The unanswered writes (``pending_tokens``: the tokens they carry) get the time a waiting
        step would give them (the deadline plus their allowance, counted from the first such step); past it,
        each such step counts as late for the supervisor's stuck detection, as a waiting step past its
        deadline would. Steps where other rows select do not count: the indexer answers them."""
        if not self.sup.serving:  # restarting, rebuilding or down: the supervisor is already on it
            return
        now = time.monotonic()
        if self._behind_since is None:
            self._behind_since = now
        self.sup.step_finished(now > self._behind_since + deadline_s + self._allowance(pending_tokens))

    def pending_tokens(self, seqs) -> int:
        """Tokens carried by unanswered index writes of ``seqs`` (what their allowance is for)."""
        return self.sup.client.pending_index_tokens(seqs) if self.sup.serving else 0

    def behind_now(self, builds_only: bool = False) -> bool:
        """Whether any sequence is behind (:meth:`behind_seqs`), or the indexer is not serving at all."""
        seqs = self.behind_seqs(builds_only)
        return seqs is None or bool(seqs)

    def behind_seqs(self, builds_only: bool = False) -> set[int] | None:
        """At the start of a step, before its own writes: the sequences whose index writes sent earlier are
        unanswered (the indexer answers their queries after that work, other sequences' at once), or None
        when the indexer is not serving at all (every sequence). When none is behind, a later behind period
        starts afresh. ``builds_only``: only a request's first index (Build, Share) counts, not the decode's
        small Inserts (asynchronous selection does not wait for those)."""
        if not self.sup.serving:
            return None
        seqs = self.sup.client.pending_index_seqs(("build", "share") if builds_only else ("build", "insert", "share"))
        if not seqs:
            self._behind_since = None
        return seqs

    def writes_pending(self) -> set[int] | None:
        """The sequences with an unanswered index write of any kind, this step's included; None when the
        indexer is not serving."""
        if not self.sup.serving:
            return None
        return self.sup.client.pending_index_seqs()

    def first_indexes_pending(self) -> set[int] | None:
        """The sequences whose first index (Build, Share) is unanswered, this step's included; None when the
        indexer is not serving."""
        if not self.sup.serving:
            return None
        return self.sup.client.pending_index_seqs(("build", "share"))

    def begin_step(self, deadline_s: float, pending_tokens: int, wait_writes: bool = True,
                   seqs: set[int] | None = None) -> StepSelection:
        """Start a decode step: set its deadline (plus the allowance for ``pending_tokens``, the tokens of the
        unanswered writes it may wait for) and (``wait_writes``) let the indexer finish those writes (``seqs``:
        only those of the step's selecting sequences; None: every write) within it. Asynchronous selection
        does not wait: its queries are answered after those writes anyway, and only waited for when due."""
        if not self.sup.serving:
            return StepSelection(None)
        step = StepSelection(time.monotonic() + deadline_s + self._allowance(pending_tokens))
        client = self.sup.client
        if not wait_writes:  # the writes' errors are still reported, not left to pile up
            for e in client.take_errors():
                logger.error("IceCache: an indexing request failed: %s", e)
        elif client.pending_writes() if seqs is None else client.pending_index_seqs() & seqs:
            t0 = time.perf_counter()
            try:
                client.sync(timeout_s=step.left(), seqs=seqs)
            except IndexerTimeout as e:
                step.timed_out = True
                logger.warning("IceCache: indexing not finished before decode (%s); selections may fall back", e)
            except IndexerError as e:
                logger.error("IceCache: an indexing request failed: %s", e)
            step.write_wait_s = time.perf_counter() - t0
        return step

    def select(self, step: StepSelection, layer: int, seqs: list[int], q: np.ndarray, q_dtype: str | None,
               n_pages: int, **query) -> Selection:
        """Pages for ``seqs`` at indexer layer ``layer`` from queries ``q [B, H_q, d]``: sent and waited for
        within the step's deadline."""
        parts = [self.receive(step, chunk) for chunk in self.send(step, layer, seqs, q, q_dtype, n_pages, **query)]
        sel = parts[0] if len(parts) == 1 else Selection(
            np.concatenate([p.pages for p in parts]), np.concatenate([p.slots for p in parts]),
            [n for p in parts for n in p.n_tokens], any(p.fallback for p in parts),
            "; ".join(p.reason for p in parts if p.reason), sum(p.search_us for p in parts))
        return sel

    def send(self, step: StepSelection, layer: int, seqs: list[int], q: np.ndarray, q_dtype: str | None,
             n_pages: int, *, policy: str, fov, prop_to_retrieve: float, num_to_retrieve: int,
             merge: str = DEFAULT_GQA_MERGE,
             expires_at: float | None = None) -> list[SentQuery]:
        """Send the queries for ``seqs`` (one message per ``max_batch`` rows) without waiting. The indexer
        skips them once ``expires_at`` has passed (default: the step's deadline, after which nobody waits
        for them; an asynchronous query is read at a later step and expires later)."""
        limit = self.max_batch
        out = []
        for i in range(0, len(seqs), limit):
            chunk = seqs[i: i + limit]
            if step.deadline is None:  # not serving: answered by a fallback when received
                out.append(SentQuery(None, layer, chunk, n_pages))
                continue
            rid = self.sup.client.query_async(layer, chunk, q[i: i + limit], n_pages, fov=fov,
                                              prop_to_retrieve=prop_to_retrieve, num_to_retrieve=num_to_retrieve,
                                              q_dtype=q_dtype, policy=policy, merge=merge,
                                              expires_at=step.deadline if expires_at is None else expires_at)
            out.append(SentQuery(rid, layer, chunk, n_pages))
            self.metrics.queries += 1
        return out

    def ready(self, sent: SentQuery) -> bool:
        """Whether :meth:`receive` would return at once."""
        return sent.rid is None or self.sup.client.query_ready(sent.rid)

    def receive(self, step: StepSelection, sent: SentQuery, used: bool = True) -> Selection:
        """The selection of one sent message, waited for until the step's deadline (then a fallback).
        ``used``: a fallback counts only when the step attends with it (an asynchronous answer nobody
        waited for is dropped when it falls back)."""
        client = self.sup.client
        t0 = time.perf_counter()
        if sent.rid is None:
            sel = client.fallback(sent.layer, sent.seqs, sent.n_pages, f"indexer {self.sup.state}: {self.sup.reason}")
        else:
            timeouts = client.counters.timeouts
            sel = client.query_result(sent.rid, timeout_s=step.left())
            step.timed_out |= client.counters.timeouts > timeouts
        step.wait_s += time.perf_counter() - t0
        self.metrics.fallbacks += int(sel.fallback and used)
        return sel

    def drop(self, sent: SentQuery) -> None:
        if sent.rid is not None:
            self.sup.client.drop_query(sent.rid)
