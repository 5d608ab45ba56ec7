"""The runtime's side of the indexer channel: pipelined requests, deadlines, fallback, and a ledger.

* Every request gets an id; replies are matched by id, so queries for several layers and steps can be in
  flight at once (``query_async`` ... ``query_result``).
* Build, Insert, Share, Release and Reset are fire-and-forget: they return at once and their
  acknowledgements are collected whenever the client reads the socket; an error among them is counted,
  logged and raised by the next :meth:`IndexerClient.sync`. They **never raise for an unreachable
  indexer**: the ledger is updated first, the write that could not be sent is counted (``unsent``) and
  the client is marked ``diverged`` (the indexer no longer holds what the ledger says) until a
  :meth:`replay` into a fresh indexer.
* ``query_result(rid, timeout_s)`` never hangs: past the deadline, or when the indexer is unreachable or
  refuses the query, it returns a :class:`Selection` with ``fallback=True`` holding each sequence's most
  recent indexed pages (from the ledger), and counts the event. A late reply is dropped.
* The :class:`Ledger` mirrors what the indexer holds (per sequence: the key-store slots in indexed order
  and the count per layer), which is all a restarted indexer needs to be rebuilt (:meth:`replay`).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from ..index.config import DEFAULT_PROP_TO_RETRIEVE
from . import protocol as p

logger = logging.getLogger("icecache.indexer.client")


class IndexerError(RuntimeError):
    """The indexer answered with an error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code


class IndexerTimeout(TimeoutError):
    """No reply before the deadline."""


class IndexerUnavailable(ConnectionError):
    """The request could not be sent (no indexer connected)."""


# ---------------------------------------------------------------------------------------------- ledger
class _Slots:
    """A growable int64 array."""

    def __init__(self, data: np.ndarray | None = None):
        self.buf = np.empty(max(16, 0 if data is None else 2 * data.size), np.int64)
        self.n = 0
        if data is not None:
            self.extend(data)

    def extend(self, a: np.ndarray) -> None:
        if self.n + a.size > self.buf.size:
            self.buf = np.concatenate([self.buf[: self.n], np.empty(max(self.n + a.size, 2 * self.buf.size) - self.n,
                                                                     np.int64)])
        self.buf[self.n: self.n + a.size] = a
        self.n += a.size

    def view(self, n: int | None = None) -> np.ndarray:
        return self.buf[: self.n if n is None else n]


@dataclass
class _SeqRecord:
    slots: _Slots = field(default_factory=_Slots)
    counts: dict[int, int] = field(default_factory=dict)


class Ledger:
    """What each sequence has indexed, as the client sent it. Every layer of a sequence indexes the same
    slots in the same order (a slot addresses all layers), possibly up to different counts."""

    def __init__(self):
        self.seqs: dict[int, _SeqRecord] = {}

    def _record(self, seq: int, layers: list[int], slots: np.ndarray, base: dict[int, int]) -> None:
        rec = self.seqs.setdefault(seq, _SeqRecord())
        for layer in layers:
            start = base.get(layer, 0)
            have = rec.slots.n - start
            overlap = min(have, slots.size)
            if overlap > 0 and not np.array_equal(rec.slots.view()[start: start + overlap], slots[:overlap]):
                raise ValueError(f"sequence {seq}: layer {layer} indexes different slots than its other layers; "
                                 "every layer of a sequence must index the same slots in the same order")
            if slots.size > have:
                if have < 0:
                    raise ValueError(f"sequence {seq}: layer {layer} is ahead of the recorded slots")
                rec.slots.extend(slots[have:])
            rec.counts[layer] = start + slots.size

    def build(self, seq: int, layers: list[int], slots: np.ndarray) -> None:
        rec = self.seqs.get(seq)
        if rec is not None and set(rec.counts) <= set(layers):  # every indexed layer starts over
            del self.seqs[seq]
        self._record(seq, layers, slots, {})

    def insert(self, seq: int, layers: list[int], slots: np.ndarray) -> None:
        rec = self.seqs.get(seq)
        self._record(seq, layers, slots, rec.counts if rec is not None else {})

    def share(self, src: int, dst: int, prefix_len: int) -> None:
        if src not in self.seqs or src == dst:
            raise ValueError(f"cannot share sequence {src} with {dst}: " +
                             ("it is the same sequence" if src == dst else "the source is unknown"))
        s = self.seqs[src]
        counts = {layer: min(prefix_len, c) for layer, c in s.counts.items() if min(prefix_len, c) > 0}
        self.seqs[dst] = _SeqRecord(_Slots(s.slots.view(max(counts.values(), default=0)).copy()), counts)

    def release(self, seqs) -> None:
        for s in seqs:
            self.seqs.pop(s, None)

    def reset(self) -> None:
        self.seqs.clear()

    def count(self, seq: int, layer: int) -> int:
        rec = self.seqs.get(seq)
        return rec.counts.get(layer, 0) if rec is not None else 0

    def recent_pages(self, seq: int, layer: int, n_pages: int, page_size: int) -> np.ndarray:
        """The ``n_pages`` most recent positional pages of indexed slots, newest first -> [P, C] (-1 pad)."""
        out = np.full((n_pages, page_size), -1, np.int32)
        n = self.count(seq, layer)
        if n == 0:
            return out
        slots = self.seqs[seq].slots.view(n)
        last = (n - 1) // page_size  # the page holding the newest token
        for i in range(min(n_pages, last + 1)):
            lo = (last - i) * page_size
            chunk = slots[lo: min(lo + page_size, n)]
            out[i, : chunk.size] = chunk
        return out

    def replay(self) -> list[tuple[p.Build, np.ndarray]]:
        """Build requests that recreate every sequence (shared prefixes come back as separate copies)."""
        out = []
        for seq, rec in self.seqs.items():
            by_count: dict[int, list[int]] = {}
            for layer, c in rec.counts.items():
                by_count.setdefault(c, []).append(layer)
            for c, layers in sorted(by_count.items()):
                out.append((p.Build(seq=seq, layers=sorted(layers)), rec.slots.view(c)))
        return out


# ---------------------------------------------------------------------------------------------- client
@dataclass
class Selection:
    """Pages chosen for one query batch. ``pages [B, H_kv, P]`` (-1 padded; all -1 on fallback),
    ``slots [B, H_kv, P, C]`` key-store slots of their tokens (-1 padded), ``n_tokens`` indexed per
    sequence. ``fallback`` says the indexer did not answer in time (``reason``): ``slots`` then holds each
    sequence's most recent indexed pages, the same for every KV head."""

    pages: np.ndarray
    slots: np.ndarray | None
    n_tokens: list[int]
    fallback: bool = False
    reason: str = ""
    search_us: float = 0.0


@dataclass
class ClientCounters:
    sent: int = 0
    replies: int = 0
    late_replies: int = 0
    async_errors: int = 0
    fallbacks: int = 0
    timeouts: int = 0
    unsent: int = 0  # writes that could not be sent (no indexer connected): in the ledger only


@dataclass
class _PendingQuery:
    layer: int
    seqs: list[int]
    n_pages: int
    want_slots: bool
    failed: str = ""  # set when the request never left


class IndexerClient:
    """One DEALER socket to one indexer. Not thread-safe: one scheduler thread drives it.

    ``num_kv_heads`` and ``page_size`` shape fallback selections; ``timeout_s`` is the default deadline of
    synchronous calls; ``is_alive`` (optional) tells a dead indexer from a slow one."""

    def __init__(self, endpoint: str, num_kv_heads: int, page_size: int, timeout_s: float = 5.0,
                 is_alive=None):
        self.H, self.C = num_kv_heads, page_size
        self.timeout_s = timeout_s
        self.is_alive = is_alive
        self.ledger = Ledger()
        self.counters = ClientCounters()
        self._ids = itertools.count(1)
        self._ctx = zmq.Context.instance()
        self._sock = None
        self._replies: dict[int, tuple[p.Reply, dict]] = {}
        self._acks: set[int] = set()
        # the unacknowledged Build / Insert / Share among _acks: kind, the sequence it writes (a Share: its
        # destination) and the tokens it carries
        self._index_writes: dict[int, tuple[str, frozenset[int], int]] = {}
        self._queries: dict[int, _PendingQuery] = {}
        self._errors: list[IndexerError] = []
        self._waiting: set[int] = set()
        self.diverged = False  # a write was lost: the indexer must be rebuilt from the ledger (replay)
        self.last_rid = 0  # id of the last request sent
        self.last_reply_at = time.monotonic()  # when the indexer last answered anything
        self.connect(endpoint)

    # ------------------------------------------------------------------ socket
    def connect(self, endpoint: str) -> None:
        """(Re)connect, forgetting everything in flight on the old connection."""
        if self._sock is not None:
            self._sock.close(0)
        self.endpoint = endpoint
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a live peer: a dead indexer fails sends at once
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.connect(endpoint)
        self._sock = s
        self._replies.clear()
        self._acks.clear()
        self._index_writes.clear()
        for q in self._queries.values():
            q.failed = q.failed or "reconnected"

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def submit(self, op, arrays: dict | None = None, wait_connect_s: float = 0.0) -> int:
        """Send one request; returns its id. Raises :class:`IndexerUnavailable` if no indexer is connected
        (after waiting ``wait_connect_s`` for the connection to come up)."""
        rid = next(self._ids)
        frames = p.encode_request(rid, op, arrays)
        deadline = time.monotonic() + wait_connect_s
        while True:
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise IndexerUnavailable(f"no indexer connected at {self.endpoint}") from None
                time.sleep(0.002)
        self.counters.sent += 1
        self.last_rid = rid
        return rid

    def _read(self, timeout_ms: int) -> bool:
        """Read at most one reply; False when none arrived in ``timeout_ms``."""
        if not self._sock.poll(timeout_ms):
            return False
        frames = self._sock.recv_multipart(copy=False)
        try:
            rep, arrays = p.decode_reply(frames)
        except Exception as e:  # noqa: BLE001 - a reply we cannot read is dropped, its request times out
            logger.error("unreadable reply from the indexer dropped: %s", e)
            return True
        self.counters.replies += 1
        self.last_reply_at = time.monotonic()
        if rep.id in self._acks:
            self._acks.discard(rep.id)
            self._index_writes.pop(rep.id, None)
            if not rep.ok:
                err = IndexerError(rep.code, rep.error)
                self.counters.async_errors += 1
                self._errors.append(err)
                logger.error("indexer request %d failed: %s", rep.id, err)
        elif rep.id in self._queries or rep.id in self._waiting:
            self._replies[rep.id] = (rep, arrays)
        else:
            self.counters.late_replies += 1
        return True

    def poll(self) -> None:
        """Collect every reply that has arrived, without waiting."""
        while self._read(0):
            pass

    def wait(self, rid: int, timeout_s: float | None = None) -> tuple[p.Reply, dict]:
        """The reply to ``rid``; :class:`IndexerTimeout` past the deadline, :class:`IndexerError` if it is
        an error reply."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        self._waiting.add(rid)
        try:
            while rid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.poll()  # a reply that has already arrived counts, even with no time left
                    if rid in self._replies:
                        break
                    raise IndexerTimeout(f"no reply to request {rid} within {timeout_s:.3f} s")
                self._read(max(1, int(left * 1000)))
        finally:
            self._waiting.discard(rid)
        rep, arrays = self._replies.pop(rid)
        if not rep.ok:
            raise IndexerError(rep.code, rep.error)
        return rep, arrays

    def call(self, op, arrays: dict | None = None, timeout_s: float | None = None):
        """Send and wait: the result struct (and reply arrays when there are any)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        rep, out = self.wait(self.submit(op, arrays, wait_connect_s=timeout_s), timeout_s)
        return (rep.result, out) if out else rep.result

    def _ack(self, op, arrays: dict | None = None, indexing: str = "") -> int:
        """Send a write; -1 (and ``diverged``) when no indexer is connected: the ledger has it anyway.
        ``indexing``: the kind of a write that adds to an index ("build", "insert", "share"), which queries
        queue behind."""
        try:
            rid = self.submit(op, arrays)
        except IndexerUnavailable:
            self.counters.unsent += 1
            if not self.diverged:
                logger.warning("indexer unreachable at %s: writes are kept in the ledger until it is rebuilt",
                               self.endpoint)
            self.diverged = True
            return -1
        self._acks.add(rid)
        if indexing:  # a Share's source is only read: its own queries are not held back by it
            seq = op.dst if isinstance(op, p.Share) else op.seq
            tokens = op.prefix_len if isinstance(op, p.Share) else int(arrays["slots"].size)
            self._index_writes[rid] = (indexing, frozenset((seq,)), tokens)
        return rid

    def pending_writes(self) -> int:
        """Fire-and-forget requests not acknowledged yet (after collecting what has arrived)."""
        self.poll()
        return len(self._acks)

    def pending_index_seqs(self, kinds: tuple[str, ...] = ("build", "insert", "share")) -> set[int]:
        """The sequences named by unacknowledged index writes of ``kinds`` (after collecting what has
        arrived): the indexer answers their queries after that work, other sequences' at once."""
        self.poll()
        return {s for k, seqs, _ in self._index_writes.values() if k in kinds for s in seqs}

    def pending_index_tokens(self, seqs) -> int:
        """Tokens carried by the unacknowledged index writes of ``seqs`` (each counted once, not per layer)."""
        mine = frozenset(seqs)
        return sum(n for _, named, n in self._index_writes.values() if named & mine)

    def acked_through(self, rid: int) -> bool:
        """Whether every fire-and-forget request up to ``rid`` is acknowledged (after collecting replies)."""
        self.poll()
        return all(a > rid for a in self._acks)

    def sync(self, timeout_s: float | None = None, seqs=None) -> None:
        """Wait until every fire-and-forget request is acknowledged (``seqs``: only the index writes that name
        one of those sequences); raise the first error among them."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        mine = None if seqs is None else frozenset(seqs)

        def waiting() -> int:
            if mine is None:
                return len(self._acks)
            return sum(bool(named & mine) for _, named, _ in self._index_writes.values())
        while waiting():
            left = deadline - time.monotonic()
            if left <= 0:
                raise IndexerTimeout(f"{waiting()} request(s) unacknowledged after {timeout_s:.3f} s")
            self._read(max(1, int(left * 1000)))
        if self._errors:
            err, self._errors = self._errors[0], []
            raise err

    # ------------------------------------------------------------------ operations
    @staticmethod
    def _slots(slots) -> np.ndarray:
        s = np.asarray(slots)
        if s.dtype.kind not in "iu" or s.ndim != 1:
            raise ValueError(f"slots must be a 1-D integer array, got {s.dtype} {s.shape}")
        return s.astype(np.int32 if s.size == 0 or s.max() < 2**31 else np.int64)

    # Writes update the ledger before they are sent, so a write that cannot be sent is still replayed by
    # the next restart.
    def build(self, seq: int, layers, slots) -> int:
        s = self._slots(slots)
        self.ledger.build(seq, list(layers), s)
        return self._ack(p.Build(seq=seq, layers=[int(x) for x in layers]), {"slots": s}, indexing="build")

    def insert(self, seq: int, layers, slots) -> int:
        s = self._slots(slots)
        self.ledger.insert(seq, list(layers), s)
        return self._ack(p.Insert(seq=seq, layers=[int(x) for x in layers]), {"slots": s}, indexing="insert")

    def share(self, src: int, dst: int, prefix_len: int) -> int:
        self.ledger.share(src, dst, prefix_len)
        return self._ack(p.Share(src=src, dst=dst, prefix_len=int(prefix_len)), indexing="share")

    def release(self, seqs) -> int:
        seqs = [int(s) for s in seqs]
        self.ledger.release(seqs)
        return self._ack(p.Release(seqs=seqs))

    def reset(self) -> int:
        self.ledger.reset()
        return self._ack(p.Reset())

    def ping(self, timeout_s: float | None = None) -> p.Pong:
        return self.call(p.Ping(), timeout_s=timeout_s)

    def stats(self, timeout_s: float | None = None) -> p.StatsResult:
        return self.call(p.Stats(), timeout_s=timeout_s)

    def shutdown(self, timeout_s: float = 2.0) -> None:
        self.call(p.Shutdown(), timeout_s=timeout_s)

    def replay(self) -> int:
        """Rebuild a fresh indexer from the ledger; returns the number of Build requests sent (``diverged``
        again if one of them could not be sent)."""
        self.diverged = False
        reqs = self.ledger.replay()
        for op, slots in reqs:
            self._ack(op, {"slots": self._slots(slots)})
        return len(reqs)

    # ------------------------------------------------------------------ queries
    def query_async(self, layer: int, seqs, q: np.ndarray, n_pages: int, *, fov: int | None = None,
                    prop_to_retrieve: float = DEFAULT_PROP_TO_RETRIEVE, num_to_retrieve: int = 0, want_slots: bool = True,
                    q_dtype: str | None = None, policy: str = "icecache", merge: str = "rank",
                    expires_at: float | None = None) -> int:
        """Send a Query for ``q [B, H_q, d]`` (float32/float16, or raw bfloat16 words with
        ``q_dtype="bfloat16"``); returns an id for :meth:`query_result`. Never raises for an unreachable
        indexer: the result will be a fallback. ``expires_at`` (``time.monotonic()``): the indexer skips
        the query if it reads it later than that."""
        seqs = [int(s) for s in seqs]
        op = p.Query(layer=int(layer), seqs=seqs, n_pages=int(n_pages), fov=fov,
                     prop_to_retrieve=float(prop_to_retrieve), num_to_retrieve=int(num_to_retrieve),
                     want_slots=want_slots, policy=policy, merge=merge, expires_at=expires_at)
        pending = _PendingQuery(int(layer), seqs, int(n_pages), want_slots)
        arr = (q, q_dtype) if q_dtype else q
        try:
            rid = self.submit(op, {"q": arr})
        except IndexerUnavailable as e:
            rid = next(self._ids)
            pending.failed = str(e)
        self._queries[rid] = pending
        return rid

    def query_result(self, rid: int, timeout_s: float | None = None) -> Selection:
        """The selection for ``rid``, or a fallback selection once ``timeout_s`` has passed."""
        pending = self._queries.get(rid)
        if pending is None:
            raise KeyError(f"no query {rid} in flight")
        try:
            if pending.failed:
                return self._fallback(pending, pending.failed)
            try:
                rep, arrays = self.wait(rid, timeout_s)
            except IndexerTimeout as e:
                self.counters.timeouts += 1
                dead = self.is_alive is not None and not self.is_alive()
                return self._fallback(pending, "indexer process is dead" if dead else str(e))
            except IndexerError as e:
                return self._fallback(pending, str(e))
            res: p.QueryResult = rep.result
            return Selection(arrays["pages"], arrays.get("slots"), list(res.n_tokens), search_us=res.search_us)
        finally:
            self._queries.pop(rid, None)

    def query_ready(self, rid: int) -> bool:
        """Whether :meth:`query_result` would return at once for ``rid`` (after collecting what has
        arrived): its reply is in, or the request never left."""
        pending = self._queries.get(rid)
        if pending is None:
            raise KeyError(f"no query {rid} in flight")
        if pending.failed:
            return True
        self.poll()
        return rid in self._replies

    def take_errors(self) -> list[IndexerError]:
        """The errors of fire-and-forget requests answered so far (after collecting replies), forgotten."""
        self.poll()
        errors, self._errors = self._errors, []
        return errors

    def queries_in_flight(self) -> int:
        """Queries sent whose result nobody has read yet."""
        return len(self._queries)

    def drop_query(self, rid: int) -> None:
        """Forget a query nobody will read (its sequences finished); a reply arriving later is counted late."""
        self._queries.pop(rid, None)
        self._replies.pop(rid, None)

    def query(self, layer: int, seqs, q: np.ndarray, n_pages: int, timeout_s: float | None = None,
              **kw) -> Selection:
        return self.query_result(self.query_async(layer, seqs, q, n_pages, **kw), timeout_s)

    def fallback(self, layer: int, seqs, n_pages: int, reason: str, want_slots: bool = True) -> Selection:
        """A fallback selection without asking the indexer (it is known not to be serving)."""
        return self._fallback(_PendingQuery(int(layer), [int(s) for s in seqs], int(n_pages), want_slots), reason)

    def _fallback(self, pending: _PendingQuery, reason: str) -> Selection:
        self.counters.fallbacks += 1
        n = self.counters.fallbacks
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th, ...: a dead indexer must not flood the log
            logger.warning("indexer selection fell back to recent pages (%d so far): %s", n, reason)
        B, P = len(pending.seqs), pending.n_pages
        pages = np.full((B, self.H, P), -1, np.int32)
        slots = np.full((B, self.H, P, self.C), -1, np.int32) if pending.want_slots else None
        if slots is not None:
            for b, s in enumerate(pending.seqs):
                slots[b] = self.ledger.recent_pages(s, pending.layer, P, self.C)[None]
        n_tokens = [self.ledger.count(s, pending.layer) for s in pending.seqs]
        return Selection(pages, slots, n_tokens, fallback=True, reason=reason)
