"""The indexer's table of sequences: per (sequence, layer) one index, shared copy-on-write.

A radix-cache hit gives a new sequence the index of a cached prefix. When the prefix is all the source
has indexed at a layer, both sequences point at the same :class:`PagedDCIIndex` (a reference count);
whichever writes to it first (an Insert or a Build) gets its own copy, so a prefix is never re-indexed
and a shared index is never changed under another sequence. A shorter prefix is a copy with the tail
removed (or, when the tail is most of the index, a rebuild of the prefix from the index's own key rows).

Token ids inside an index are insertion order and an index's ``positions`` are key-store slots, so the
first ``k`` live ids of an index are its first ``k`` indexed tokens and the slots of a selected page come
straight out of the index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..index.paged_index import PagedDCIIndex, StateList


@dataclass
class SharedIndex:
    index: PagedDCIIndex
    refs: int = 1


@dataclass
class TableCounters:
    builds: int = 0
    inserts: int = 0
    shares: int = 0
    copies: int = 0
    trims: int = 0
    indexed_tokens: int = 0  # tokens received by build/insert, summed over layers (not shares or rebuilds)


@dataclass
class SequenceTable:
    """``seqs[seq][layer]`` -> :class:`SharedIndex`; ``new_index()`` makes an empty per-layer index."""

    new_index: Callable[[], PagedDCIIndex]
    trim_rebuild_ratio: float = 0.25
    #: ``(layer, positions) -> keys [H, n, d]``: the exact keys at an index's positions (the key store), which
    #: a rebuilt prefix is built from; None: from the index's own rows (exact only for float32 / bfloat16)
    read_keys: Callable[[int, np.ndarray], np.ndarray] | None = None
    seqs: dict[int, dict[int, SharedIndex]] = field(default_factory=dict)
    counters: TableCounters = field(default_factory=TableCounters)
    states: StateList = field(default_factory=StateList)  # live indexes' state tuples, for batched search

    def _unref(self, entry: SharedIndex) -> None:
        entry.refs -= 1
        if entry.refs == 0:
            self.states.drop(entry.index)

    # ------------------------------------------------------------------ reads
    def __contains__(self, seq: int) -> bool:
        return seq in self.seqs

    def get(self, seq: int, layer: int) -> PagedDCIIndex | None:
        entry = self.seqs[seq].get(layer)
        return entry.index if entry is not None else None

    def n_tokens(self, seq: int, layer: int) -> int:
        idx = self.get(seq, layer)
        return idx.n_live if idx is not None else 0

    def distinct(self) -> list[SharedIndex]:
        seen: dict[int, SharedIndex] = {}
        for layers in self.seqs.values():
            for e in layers.values():
                seen.setdefault(id(e), e)
        return list(seen.values())

    # ------------------------------------------------------------------ writes
    def _drop(self, seq: int, layer: int) -> None:
        entry = self.seqs.get(seq, {}).pop(layer, None)
        if entry is not None:
            self._unref(entry)

    def begin_write(self, kind: str, seq: int, layers: list[int], read_keys: Callable[[int], np.ndarray],
                    slots: np.ndarray) -> TableWrite:
        """The first of a write's three parts; the table is read and changed only in the first and last.

        1. here, in the table's thread: the indexes to extend (a shared one is copied first);
        2. :meth:`TableWrite.run`, in any thread: the layers' index work, ``read_keys(layer) -> [H, n, d]``
           included, through ``run`` (``map``'s signature: the service passes its write workers' ``map``);
        3. :meth:`TableWrite.commit`, in the table's thread: the new indexes and the counters. When a layer
           failed, the layers that succeeded are kept and the first failure is raised.

        Until the commit, nothing else may touch ``seq`` (the server holds back its other requests)."""
        if kind not in ("build", "insert"):
            raise ValueError(f"kind must be 'build' or 'insert', got {kind!r}")
        jobs = []
        for layer in layers:
            entry = self.seqs.setdefault(seq, {}).get(layer) if kind == "insert" else None
            # a shared index is copied by the write's work (run), not here: a long copy would hold up the table
            jobs.append((layer, None if entry is None else entry.index, entry is not None and entry.refs > 1))
        return TableWrite(self, seq, jobs, read_keys, slots)

    def _commit(self, w: TableWrite) -> list[int]:
        counts, error = [], None
        for (layer, _, _), res in zip(w.jobs, w.results):
            if isinstance(res, Exception):
                error = error or res
                continue
            idx, fresh, copied, n = res
            self.counters.indexed_tokens += n
            if fresh:
                self.counters.builds += 1
                self._drop(w.seq, layer)
                indexed = self.seqs.setdefault(w.seq, {})  # a sequence built from no tokens is still known
                if n:
                    indexed[layer] = SharedIndex(idx)
            else:
                self.counters.inserts += 1
                if copied:  # copy on write: this sequence leaves the shared index for its own copy
                    self.counters.copies += 1
                    self._drop(w.seq, layer)
                    self.seqs[w.seq][layer] = SharedIndex(idx)
            counts.append(idx.n_live if n or not fresh else 0)
        if error is not None:
            raise error
        return counts

    def begin_share(self, src: int, dst: int, prefix_len: int) -> TableShare:
        """A Share in the three parts of a write (:meth:`begin_write`): a layer whose whole index is shared
        is a reference; a shorter prefix is a new index, made by the work (any thread)."""
        if src not in self.seqs:
            raise KeyError(src)
        jobs = [(layer, entry, min(prefix_len, entry.index.n_live)) for layer, entry in sorted(self.seqs[src].items())]
        return TableShare(self, dst, jobs)

    def _prefix_of(self, idx: PagedDCIIndex, keep: int, layer: int) -> tuple[PagedDCIIndex, str]:
        """A new index of the first ``keep`` live tokens of ``idx`` and how it was made ("copy" or "build"). A
        rebuilt prefix is built from the exact keys (``read_keys``), as a fresh Build of it would be: an int8
        index's own rows are quantized against the whole sequence's channel scales."""
        live = idx.live_ids()
        tail = live[keep:]
        if tail.size <= self.trim_rebuild_ratio * live.size:
            new = idx.copy()
            new.delete(tail)
            return new, "copy"
        head = live[:keep]
        new = self.new_index()
        pos = idx.positions[head]
        new.build(idx.keys_of(head) if self.read_keys is None else self.read_keys(layer, pos), positions=pos)
        return new, "build"

    def _commit_share(self, s: TableShare) -> list[int]:
        errors = [r for r in s.results if isinstance(r, Exception)]
        if errors:  # dst is left as it was
            raise errors[0]
        self.release(s.dst)
        out = self.seqs[s.dst] = {}
        self.counters.shares += 1
        counts = []
        for (layer, entry, keep), res in zip(s.jobs, s.results):
            counts.append(keep)
            if keep == 0:
                continue
            if res is None:  # the whole index: shared
                entry.refs += 1
                out[layer] = entry
            else:
                new, how = res
                out[layer] = SharedIndex(new)
                self.counters.trims += 1
                if how == "copy":
                    self.counters.copies += 1
                else:
                    self.counters.builds += 1
        return counts

    def release(self, seq: int) -> bool:
        layers = self.seqs.pop(seq, None)
        if layers is None:
            return False
        for entry in layers.values():
            self._unref(entry)
        return True

    def reset(self) -> int:
        n = len(self.seqs)
        for seq in list(self.seqs):
            self.release(seq)
        return n


class _LayerWork:
    """What :class:`TableWrite` and :class:`TableShare` share: ``run`` does ``_one`` for every job."""

    jobs: list
    results: list

    def run(self, run: Callable = map) -> None:
        """The index work of every layer (any thread; touches no table state)."""
        self.results = list(run(self._one, self.jobs))


@dataclass
class TableWrite(_LayerWork):
    """A Build or Insert between :meth:`SequenceTable.begin_write` and its commit."""

    table: SequenceTable
    seq: int
    jobs: list  # (layer, the index to extend or None for a new one, whether that index is shared: copy it)
    read_keys: Callable[[int], np.ndarray]
    slots: np.ndarray
    results: list = field(default_factory=list)

    def _one(self, job):
        layer, idx, shared = job
        try:
            keys = self.read_keys(layer)
            if idx is None:
                idx = self.table.new_index()
                if keys.shape[1]:
                    idx.build(keys, positions=self.slots)
                return idx, True, False, keys.shape[1]
            if shared:  # the other holders keep reading the original meanwhile
                idx = idx.copy()
            if keys.shape[1]:
                idx.insert(keys, positions=self.slots)
            return idx, False, shared, keys.shape[1]
        except Exception as e:  # noqa: BLE001 - raised by the commit, after the other layers are kept
            return e

    def commit(self) -> list[int]:
        return self.table._commit(self)


@dataclass
class TableShare(_LayerWork):
    """A Share between :meth:`SequenceTable.begin_share` and its commit."""

    table: SequenceTable
    dst: int
    jobs: list  # (layer, the source's entry, tokens to keep)
    results: list = field(default_factory=list)

    def needs_work(self) -> int:
        """Tokens of the source indexes a shorter prefix is cut from (0: every layer is a reference)."""
        return sum(e.index.n_live for _, e, keep in self.jobs if 0 < keep < e.index.n_live)

    def _one(self, job):
        layer, entry, keep = job
        try:
            return self.table._prefix_of(entry.index, keep, layer) if 0 < keep < entry.index.n_live else None
        except Exception as e:  # noqa: BLE001 - raised by the commit
            return e

    def commit(self) -> list[int]:
        return self.table._commit_share(self)
