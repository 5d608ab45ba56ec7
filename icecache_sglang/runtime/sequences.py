"""Which tokens of which request the indexer holds, keyed by KV slot, across SGLang's request lifecycle.

SGLang identifies a running request by its ``req_to_token`` row and its tokens by KV slots; the radix
cache shares slots between requests and frees them on eviction. The indexer identifies a sequence by an
id we choose. This module maps one to the other:

- A **live** sequence belongs to a running request (one per ``req_to_token`` row). It indexes positions
  ``[sink, end)`` in order, lazily: nothing while the request fits in the budget (its attention is dense),
  then everything up to the recent window, then the window's oldest tokens in blocks as decoding goes.
- When the row is freed (finish, abort, retraction) the sequence is **retained**, not released: its slots
  may live on in the radix cache. A later request whose row starts with the same slots (a prefix hit)
  gets that index with ``Share`` and indexes only its new tokens.
- Every slot an index holds is reference counted here. When SGLang frees a slot (radix eviction, a
  request without radix cache, ``flush_cache``, a duplicate freed by ``release_kv_cache``), every retained
  sequence holding it is released, and a live one is marked stale and rebuilt from its row at its next
  step. So an index never names a slot whose keys were overwritten, whatever path freed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

import numpy as np

from ..indexer.client import IndexerClient


@dataclass
class TrackedSeq:
    seq: int
    row: int
    slots: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))  # slots of [sink, sink + n)
    stale: bool = False

    @property
    def n(self) -> int:
        return int(self.slots.size)


@dataclass
class TrackerCounters:
    builds: int = 0
    inserts: int = 0
    shares: int = 0
    shared_tokens: int = 0  # tokens received through Share instead of being indexed again
    indexed_tokens: int = 0  # tokens sent in Build/Insert (per token, not per layer)
    releases: int = 0
    stale_rebuilds: int = 0
    superseded: int = 0  # retained sequences released because a longer one covers them


class SequenceTracker:
    """Maps ``req_to_token`` rows and KV slots to indexer sequences. One per TP rank; not thread-safe.

    ``layers``: indexer layer ids to index (the anchor layers). ``sink`` / ``window``: positions never
    indexed at the start and the end. ``budget``: a request at most this long is not indexed (dense).
    ``block``: decode indexes the window's oldest tokens once at least this many are waiting."""

    def __init__(self, client: IndexerClient, layers: list[int], num_slots: int, *, sink: int, window: int,
                 budget: int, block: int, max_retained: int = 4096):
        self.client = client
        self.layers = list(layers)
        self.sink, self.window, self.budget, self.block = sink, max(window, 1), budget, max(block, 1)
        self.max_retained = max_retained
        self.slot_refs = np.zeros(num_slots, np.int32)
        self.live: dict[int, TrackedSeq] = {}  # row -> sequence
        self.retained: dict[int, TrackedSeq] = {}  # seq id -> sequence (insertion order = age)
        self._by_first: dict[int, set[int]] = {}  # slot of position `sink` -> retained seq ids
        self._ids = count(1)
        self.counters = TrackerCounters()

    # ------------------------------------------------------------------ running requests
    def indexed_end(self, row: int) -> int:
        """Positions ``[sink, indexed_end)`` of the request on ``row`` are in its index (``sink`` if none)."""
        st = self.live.get(row)
        return self.sink + (st.n if st is not None and not st.stale else 0)

    def indexed_ends_of(self, seqs: list[int]) -> list[int | None]:
        """:meth:`indexed_end` of each sequence id of ``seqs``; None for one no longer decoding sparsely."""
        by_seq = {st.seq: st for st in self.live.values() if not st.stale and st.n > 0}
        return [self.sink + by_seq[s].n if s in by_seq else None for s in seqs]

    def is_sparse(self, row: int) -> bool:
        st = self.live.get(row)
        return st is not None and not st.stale and st.n > 0

    def indexed_slots(self, row: int) -> np.ndarray:
        """The slots of positions ``[sink, indexed_end)`` of the request on ``row`` (what its index holds;
        empty without one). Where SGLang re-points a running request's row (the radix cache taking a
        prefill's tokens into the tree) it frees the slots it replaces, and a freed slot marks the index
        stale (:meth:`slots_freed`): so while :meth:`is_sparse` these are the row's own."""
        st = self.live.get(row)
        return st.slots if st is not None and not st.stale else np.empty(0, np.int32)

    def update(self, row: int, row_slots: np.ndarray, seq_len: int, *, block: int = 1, verify: bool = False,
               offset: int = 0) -> bool:
        """Bring the index of the request on ``row`` up to ``seq_len - window`` (``row_slots`` holds the
        row's slots for positions ``[offset, seq_len)``, all of them with keys written) once it is longer
        than the budget; decode passes ``block`` to send tokens in batches. ``verify`` compares the indexed
        slots with the row (after a prefill chunk, where the radix cache may have re-pointed the row).
        ``offset`` > 0 (a decode step reads only the row's positions past :meth:`indexed_end`) is for a
        request with a current index (:meth:`is_sparse`); any other needs its whole row. Returns whether the
        request is indexed (its decode attention is sparse)."""
        st = self.live.get(row)
        if offset and (st is None or st.stale or st.n == 0 or verify or offset > self.sink + st.n):
            raise ValueError(f"row {row}: its slots from position {offset} on do not cover what its index needs "
                             f"(indexed to {self.indexed_end(row)}, verify={verify})")
        if st is None:
            if seq_len <= self.budget:
                return False
            st = self.live[row] = TrackedSeq(next(self._ids), row)
            self._share_prefix(st, row_slots, seq_len)
        elif verify and not st.stale and not np.array_equal(st.slots, row_slots[self.sink: self.sink + st.n]):
            st.stale = True
        if st.stale:
            self._forget(st)
            st.seq, st.stale = next(self._ids), False
            self.counters.stale_rebuilds += 1
        end = seq_len - self.window
        start = self.sink + st.n
        if end - start >= (1 if st.n == 0 else block):
            new = np.ascontiguousarray(row_slots[start - offset:end - offset], dtype=np.int32)
            if st.n == 0:
                self.client.build(st.seq, self.layers, new)
                self.counters.builds += 1
            else:
                self.client.insert(st.seq, self.layers, new)
                self.counters.inserts += 1
            self.counters.indexed_tokens += new.size
            st.slots = np.concatenate([st.slots, new])
            self.slot_refs[new] += 1
        return st.n > 0

    def _share_prefix(self, st: TrackedSeq, row_slots: np.ndarray, seq_len: int) -> None:
        end = seq_len - self.window
        if end <= self.sink:
            return
        best, best_n = None, 0
        for sid in self._by_first.get(int(row_slots[self.sink]), ()):
            cand = self.retained[sid]
            m = min(cand.n, end - self.sink)
            same = cand.slots[:m] == row_slots[self.sink: self.sink + m]
            n = m if same.all() else int(np.argmin(same))
            if n > best_n:
                best, best_n = cand, n
        if best is None:
            return
        self.client.share(best.seq, st.seq, best_n)
        self.counters.shares += 1
        self.counters.shared_tokens += best_n
        st.slots = best.slots[:best_n].copy()
        self.slot_refs[st.slots] += 1

    def seq_of(self, row: int) -> int:
        return self.live[row].seq

    # ------------------------------------------------------------------ lifecycle events from SGLang
    def row_freed(self, row: int) -> None:
        """The request on ``row`` finished, aborted or was retracted: keep its index for the radix cache
        (released when any of its slots is freed)."""
        st = self.live.pop(row, None)
        if st is None:
            return
        if st.stale or st.n == 0:
            self._forget(st)
            return
        first = int(st.slots[0])
        for sid in list(self._by_first.get(first, ())):
            old = self.retained[sid]
            if old.n <= st.n and np.array_equal(old.slots, st.slots[: old.n]):
                self._release_retained(old)
                self.counters.superseded += 1
        self.retained[st.seq] = st
        self._by_first.setdefault(first, set()).add(st.seq)
        while len(self.retained) > self.max_retained:
            self._release_retained(next(iter(self.retained.values())))

    def slots_freed(self, slots: np.ndarray) -> None:
        """SGLang freed these KV slots: no index may keep naming them."""
        slots = np.asarray(slots, dtype=np.int64).ravel()
        if slots.size == 0:
            return
        slots = slots[(slots >= 0) & (slots < self.slot_refs.size)]
        if not self.slot_refs[slots].any():
            return
        hit = slots[self.slot_refs[slots] > 0]
        for st in list(self.retained.values()):
            if np.isin(st.slots, hit).any():
                self._release_retained(st)
        for st in self.live.values():
            if not st.stale and np.isin(st.slots, hit).any():
                st.stale = True  # rebuilt from its row at its next step

    def clear(self) -> None:
        """Every slot was freed at once (``flush_cache``, pool reset)."""
        self.client.reset()
        self.live.clear()
        self.retained.clear()
        self._by_first.clear()
        self.slot_refs[:] = 0

    # ------------------------------------------------------------------ internals
    def _forget(self, st: TrackedSeq) -> None:
        if st.n:
            self.slot_refs[st.slots] -= 1
        st.slots = st.slots[:0]
        self.client.release([st.seq])
        self.counters.releases += 1

    def _release_retained(self, st: TrackedSeq) -> None:
        self.retained.pop(st.seq, None)
        first = self._by_first.get(int(st.slots[0]))
        if first is not None:
            first.discard(st.seq)
            if not first:
                del self._by_first[int(st.slots[0])]
        self._forget(st)

    def summary(self) -> dict:
        return {"live": len(self.live), "retained": len(self.retained),
                "retained_tokens": int(sum(s.n for s in self.retained.values())),
                "slots_referenced": int(np.count_nonzero(self.slot_refs))}
