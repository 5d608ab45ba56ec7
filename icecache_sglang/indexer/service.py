"""The indexer's request handling, without sockets: one :class:`IndexerService` per process.

``handle(request, arrays)`` validates a decoded request against the configuration, runs it on the
:class:`~.sequences.SequenceTable` and returns ``(result, reply_arrays)``; it raises
:class:`~.protocol.ProtocolError` for anything it refuses. The socket loop (:mod:`.server`) and the
in-process benchmark both call it, so "through the process" and "in process" run the same code.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numba
import numpy as np

from ..index.config import QueryParams
from ..index.keys import PARALLEL_MIN, to_storage
from ..index import lowrank
from ..index.gqa_merge import GQA_MERGES
from .baselines import POLICIES, select_baseline
from .blas import blas_threads
from ..index.paged_index import PagedDCIIndex, query_batch
from ..index.scan_batch import scan_index_batch
from . import protocol as p
from .config import IndexerConfig
from .keystore import KeyStore
from .sequences import SequenceTable, TableShare, TableWrite

logger = logging.getLogger(__name__)

_INT64 = (-(1 << 63), (1 << 63) - 1)
#: a write of fewer tokens (a decode step's Insert) is indexed on the socket loop's thread, its layers one
#: after another; a larger one on a background thread, its layers on the write workers
POOLED_WRITE_TOKENS = 512
#: tokens of the scratch sequence :meth:`IndexerService.warmup` indexes (a tree of several levels)
WARMUP_TOKENS = 600
#: a sequence whose keys have fewer elements (tokens x KV heads x head_dim) has its exact scan (or baseline) run
#: on the query's thread alone: waking numba's threads for each of the scan's parallel regions cost more than
#: they saved (2 cores: 12 sequences of 2048 tokens x 2 heads x 32 in 0.9 ms on one thread against 1.3-4.4 ms on
#: two; 8192 x 2 x 64, 8 sequences: 1.5 against 2.8 ms; 2048 x 8 x 128: 5.2 against 4.7 ms, so two threads
#: from there on)
SERIAL_SCAN_ELEMENTS = 1 << 20
#: policies whose small sequences (under ``SERIAL_SCAN_ELEMENTS``) are scanned together in one numba call
#: (``index/scan_batch.py``): the same pages as one ``select_baseline`` per sequence, without its fixed cost per
#: sequence (``benchmarks/exact_batch.py``)
BATCHED_SCANS = ("exact", "oracle_page")
#: a query's longer sequences, below ``LONGEST_BATCHED_ELEMENTS``, are scanned together too (a second call) when it
#: has at least this many; one alone keeps the per-sequence scan, whose work items are chunks of pages
BATCHED_LONG_SEQUENCES = 2
#: sequences with this many key elements or more are always scanned one at a time (2 cores, ``exact_batch.py
#: --long``, 2-8 sequences together against one at a time: 1.5-1.7x at 2^21-2^22 elements, 1.1-1.2x at 2^23,
#: 0.96-1.08x at 2^25 (32k tokens of 8 KV heads x 128); the serving grid's 32k-128k sequences keep their path)
LONGEST_BATCHED_ELEMENTS = 1 << 24
#: that batch runs on the query's thread alone when it has fewer sequences than this, else on up to one thread per
#: (sequence, KV head) pair (2 cores, ``exact_batch.py``: at 1 sequence one thread was 5-30% faster, at 2 either
#: within 10%, from 4 two threads were up to 1.8x faster, or at worst 7% slower)
SERIAL_BATCH_SEQUENCES = 4


def _bad(message: str, code: str = "bad_request") -> p.ProtocolError:
    return p.ProtocolError(code, message)


@dataclass
class PendingWrite:
    """A Build, Insert or Share between :meth:`IndexerService.begin_write` and :meth:`IndexerService.finish_write`."""

    write: TableWrite | TableShare
    run_layers: Callable  # ``map`` over the layers (the write workers')
    tokens: int  # what it carries (a Share: the source tokens it cuts a prefix from)
    busy_us: float = 0.0
    error: BaseException | None = None

    def run(self) -> None:
        """The index work of every layer; any thread. Never raises: ``finish_write`` reports."""
        t0 = time.perf_counter()
        try:
            self.write.run(self.run_layers)
        except BaseException as e:  # noqa: BLE001 - e.g. the workers were shut down under it
            self.error = e
        self.busy_us = (time.perf_counter() - t0) * 1e6


class IndexerService:
    def __init__(self, config: IndexerConfig, store: KeyStore):
        spec = store.spec
        self.cfg = config
        self.store = store
        self.L, self.S, self.H, self.d = spec.num_layers, spec.num_slots, spec.num_kv_heads, spec.head_dim
        self.C = config.page_size
        self.table = SequenceTable(lambda: PagedDCIIndex(self.H, self.d, config=config.index),
                                   trim_rebuild_ratio=config.trim_rebuild_ratio,
                                   read_keys=lambda layer, slots: self.store.read(layer, slots))
        self.requests = self.errors = self.queries = self.query_rows = self.expired = 0
        self.lowrank_rows = 0  # sequences' queries answered through the low-rank first pass (index/lowrank.py)
        self.nonfinite_queries = 0  # sequences' queries with a non-finite value, answered with their recent pages
        self.query_us_total = self.busy_us_total = 0.0
        self._pool: ThreadPoolExecutor | None = None  # write workers, started by warmup()
        self.write_workers = 1
        self.concurrent_writes = False  # whether writes may run beside each other and queries (warmup() says)
        self._handlers = {p.Ping: self._ping, p.Build: self._write_now, p.Insert: self._write_now, p.Query: self._query,
                          p.Share: self._write_now, p.Release: self._release, p.Reset: self._reset,
                          p.Stats: self._stats, p.Shutdown: self._shutdown}

    # ------------------------------------------------------------------ entry
    def handle(self, req: p.Request, arrays: dict[str, np.ndarray]):
        """Answer ``req`` in this thread: ``(result, reply_arrays)``."""
        self.requests += 1
        return self._counted(lambda: self._handlers[type(req.op)](req.op, arrays,
                                                                  {a.name: a.dtype for a in req.arrays}))

    def begin_write(self, req: p.Request, arrays: dict[str, np.ndarray]) -> PendingWrite:
        """A Build, Insert or Share in three parts, so that the socket loop can answer other sequences
        meanwhile: this call checks and prepares it (this thread), :meth:`PendingWrite.run` indexes (any
        thread), and :meth:`finish_write` (this thread) changes the table and gives ``(result, reply_arrays)``."""
        self.requests += 1
        return self._counted(lambda: self._prepare_write(req.op, arrays))

    def in_background(self, pending: PendingWrite) -> bool:
        """Whether a prepared write should run on a background thread: it carries (a Share: cuts) at least
        ``POOLED_WRITE_TOKENS`` tokens, and numba's threading layer lets two threads run parallel regions at
        once (not the workqueue layer)."""
        return self.concurrent_writes and pending.tokens >= POOLED_WRITE_TOKENS

    def finish_write(self, pending: PendingWrite):
        self.busy_us_total += pending.busy_us  # summed over threads: may exceed the wall time
        if pending.error is not None:  # not an index's refusal (those are per layer): a bug
            raise RuntimeError(f"the write failed: {pending.error!r}") from pending.error
        return self._counted(lambda: (p.Done(tokens=pending.write.commit()), {}))

    def _counted(self, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except p.ProtocolError as e:
            self.errors += e.code != "expired"  # an expired query is the client's deadline, not an error
            raise
        except ValueError as e:  # the index refused an input (NaN keys, wrong shapes, ...)
            self.errors += 1
            raise _bad(str(e)) from None
        finally:
            self.busy_us_total += (time.perf_counter() - t0) * 1e6

    def count_error(self, new_request: bool = False) -> None:
        """An error :meth:`handle` did not count: a message refused before it (undecodable, bad version,
        bad frames; ``new_request``) or an unexpected exception inside it."""
        self.requests += int(new_request)
        self.errors += 1

    def warmup(self) -> None:
        """Compile (or load from numba's cache) every numba function a request can reach, so that the first
        real request is fast. Numba compiles once per argument type, and a read-only array is a type of its
        own, so this runs the service's own request handling (:meth:`warmup_requests`) on a scratch key store
        of the real one's dtype, read-only as the real one is mapped (``KeyStore.scratch``: no file). (Warming
        up on arrays of other types left the first query of the H100 server compiling for about 2 s: its switch
        to sparse timed out for 4 steps, bringup/attempt12.) Nothing touches the real store or table."""
        spec = self.store.spec
        n = self.warmup_tokens() + 64
        rows = np.random.default_rng(0).standard_normal((1, n, spec.num_kv_heads, spec.head_dim)).astype(np.float32)
        store = KeyStore.scratch(to_storage(rows, spec.dtype), spec.dtype)
        scratch = IndexerService(replace(self.cfg, store=store.spec, write_workers=1), store)
        try:
            scratch.warmup_requests(np.random.default_rng(1))
        finally:
            scratch.close()
            store.close()
        self._start_write_workers()

    def warmup_tokens(self) -> int:
        """Tokens the warmup's sequence holds: ``WARMUP_TOKENS``, or enough that its key rows reach
        ``PARALLEL_MIN`` values (the kernels with a serial and a parallel variant by size run both: a model of
        head_dim 64 compiled the parallel parent search inside its first real Build)."""
        return max(WARMUP_TOKENS, -(-PARALLEL_MIN // self.d))

    def warmup_requests(self, rng: np.random.Generator) -> None:
        """Every kind of request this service answers, on its own table (a scratch service's: see
        :meth:`warmup`): a Build, a decode Insert, Inserts that make the index rebuild itself, Queries of one
        and of two sequences under every policy and GQA merge with each query dtype (and a long sequence's exact
        scan, which runs apart from the batch), Shares (whole source and a cut prefix) and Releases."""
        layers, n = [0], self.warmup_tokens()
        n_pages = min(4, self.cfg.max_pages)
        batches = ([1], [1, 3]) if self.cfg.max_batch >= 2 else ([1],)

        def call(op, arrays=None):
            self.handle(*p.as_received(0, op, arrays))

        call(p.Build(seq=1, layers=layers), {"slots": np.arange(n // 2, dtype=np.int32)})
        call(p.Insert(seq=1, layers=layers), {"slots": np.arange(n // 2, n // 2 + 1, dtype=np.int32)})
        call(p.Insert(seq=1, layers=layers), {"slots": np.arange(n // 2 + 1, n, dtype=np.int32)})  # rebuilds
        call(p.Share(src=1, dst=2, prefix_len=n))
        call(p.Share(src=1, dst=3, prefix_len=n // 3))  # a long cut: the prefix rebuilt from its keys
        call(p.Share(src=1, dst=4, prefix_len=n - 5))  # a short one: the tail deleted
        call(p.Insert(seq=3, layers=layers), {"slots": np.arange(n, n + 2, dtype=np.int32)})
        q = rng.standard_normal((2, 2 * self.H, self.d)).astype(np.float32)
        for wire in ("float32", "float16", "bfloat16"):
            qw = q.astype(np.float16) if wire == "float16" else q
            if wire == "bfloat16":
                qw = (q.view(np.uint32) >> 16).astype(np.uint16)
            for policy in POLICIES:
                for merge in GQA_MERGES:
                    for seqs in batches:
                        call(p.Query(layer=0, seqs=seqs, n_pages=n_pages, policy=policy, merge=merge),
                             {"q": (qw[: len(seqs)], wire)})
        # a long sequence's exact scan runs apart from the batch of small ones (scan_index, not scan_batch)
        for merge in GQA_MERGES:
            select_baseline(self.table.get(1, 0), q[0], n_pages, "exact", merge, self.store.keys[0])
        # the low-rank first pass runs only on long indexes with a fitted basis: forced on a copy of seq 1's
        if self.store.keys.dtype in (np.float32, np.uint16):
            lowrank.warm(self.table.get(1, 0), self.store.keys[0], np.ascontiguousarray(q[0]))
        call(p.Release(seqs=[1, 2, 3, 4]))

    def _start_write_workers(self) -> None:
        """The write workers, once numba's threading layer is known: the workqueue layer (no OpenMP or TBB)
        cannot run parallel regions from two threads at once, so it gets none."""
        threads = numba.get_num_threads()
        workers = self.cfg.write_workers or min(8, threads)
        self.concurrent_writes = numba.threading_layer() != "workqueue"
        if not self.concurrent_writes:
            workers = 1
        self.write_workers = max(1, workers)
        if self.write_workers > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.write_workers, thread_name_prefix="icecache-write")

    def close(self) -> None:
        """Stop the write workers; a layer being indexed finishes, the request's other layers do not start."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------------ checks
    def _seq_id(self, name: str, v: int) -> int:
        if not (_INT64[0] <= v <= _INT64[1]):
            raise _bad(f"{name} {v} is out of the int64 range")
        return v

    def _layers(self, layers: list[int]) -> list[int]:
        if not layers:
            raise _bad("layers must name at least one layer")
        if len(set(layers)) != len(layers):
            raise _bad(f"layers has duplicates: {layers}")
        bad = [x for x in layers if not 0 <= x < self.L]
        if bad:
            raise _bad(f"layer(s) {bad} out of range [0, {self.L})", "out_of_range")
        return layers

    def _slots(self, arrays: dict) -> np.ndarray:
        if set(arrays) != {"slots"}:
            raise _bad(f"expected exactly one array named 'slots', got {sorted(arrays)}", "bad_array")
        s = arrays["slots"]
        if s.dtype.kind != "i" or s.ndim != 1:
            raise _bad(f"slots must be a 1-D int32/int64 array, got {s.dtype}{list(s.shape)}", "bad_array")
        if s.size and (s.min() < 0 or s.max() >= self.S):
            raise _bad(f"slots must lie in [0, {self.S}); got min {s.min()} max {s.max()}", "out_of_range")
        return s.astype(np.int64)

    def _known(self, seq: int) -> None:
        if seq not in self.table:
            raise _bad(f"unknown sequence {seq}", "unknown_seq")

    # ------------------------------------------------------------------ handlers
    def _ping(self, op, arrays, dtypes):
        return p.Pong(pid=os.getpid(), rank=self.cfg.rank, num_layers=self.L, num_kv_heads=self.H, head_dim=self.d,
                      page_size=self.C, num_slots=self.S), {}

    def _prepare_write(self, op, arrays) -> PendingWrite:
        """Check a Build, Insert or Share and prepare its table work (this thread)."""
        if isinstance(op, p.Share):
            work = self.table.begin_share(*self._share_args(op))
            tokens = work.needs_work()
        else:
            seq, layers, slots = self._seq_id("seq", op.seq), self._layers(op.layers), self._slots(arrays)
            kind = "insert" if isinstance(op, p.Insert) else "build"  # Insert is a subclass of Build
            work = self.table.begin_write(kind, seq, layers,
                                          lambda layer: self.store.read(layer, slots), slots)
            tokens = len(slots)
        return PendingWrite(work, self._layer_map(len(work.jobs), tokens), tokens)

    def _write_now(self, op, arrays, dtypes):
        """A Build, Insert or Share answered in this thread (:meth:`handle`)."""
        w = self._prepare_write(op, arrays)
        w.write.run(w.run_layers)
        return p.Done(tokens=w.write.commit()), {}

    def _layer_map(self, n_layers: int, n_tokens: int):
        """``map`` over a request's layers: the write workers when there are several of both and the write is
        large (a decode step's Insert is not queued behind a prompt's Build there), each worker with an even
        share of this thread's numba threads (numba's thread count is per thread)."""
        workers = min(self.write_workers, n_layers)
        if self._pool is None or workers < 2 or n_tokens < POOLED_WRITE_TOKENS:
            return map
        share = max(1, numba.get_num_threads() // workers)

        def with_share(fn):
            def run(job):
                numba.set_num_threads(share)
                return fn(job)
            return run
        return lambda fn, jobs: self._pool.map(with_share(fn), jobs)

    def _query(self, op: p.Query, arrays, dtypes):
        if not 0 <= op.layer < self.L:
            raise _bad(f"layer {op.layer} out of range [0, {self.L})", "out_of_range")
        B = len(op.seqs)
        if not 1 <= B <= self.cfg.max_batch:
            raise _bad(f"a query carries 1 to {self.cfg.max_batch} sequences, got {B}", "out_of_range")
        if not 1 <= op.n_pages <= self.cfg.max_pages:
            raise _bad(f"n_pages must be in [1, {self.cfg.max_pages}], got {op.n_pages}", "out_of_range")
        try:
            params = QueryParams(fov=op.fov, prop_to_retrieve=op.prop_to_retrieve, num_to_retrieve=op.num_to_retrieve)
        except ValueError as e:
            raise _bad(str(e)) from None
        if op.policy not in POLICIES:
            raise _bad(f"unknown policy {op.policy!r}; known: {list(POLICIES)}")
        if op.merge not in GQA_MERGES:
            raise _bad(f"unknown merge {op.merge!r}; known: {list(GQA_MERGES)}")
        late_s = time.monotonic() - op.expires_at if op.expires_at is not None else 0.0
        if late_s > 0:
            self.expired += 1
            raise _bad(f"query read {late_s:.3f} s after it expired", "expired")
        if set(arrays) != {"q"}:
            raise _bad(f"expected exactly one array named 'q', got {sorted(arrays)}", "bad_array")
        if dtypes["q"] not in ("float32", "float16", "bfloat16"):
            raise _bad(f"q must be float32, float16 or bfloat16, got {dtypes['q']}", "bad_array")
        # an aligned, writable float32 copy: the frame may be unaligned and read-only, and numba would
        # compile (and run) another specialization for that
        q = np.array(p.as_float32(arrays["q"], dtypes["q"]), dtype=np.float32, order="C")
        if q.ndim != 3 or q.shape[0] != B or q.shape[2] != self.d or q.shape[1] == 0 or q.shape[1] % self.H:
            raise _bad(f"q must have shape [B={B}, H_q (a multiple of {self.H}), {self.d}], got {list(q.shape)}",
                       "bad_array")
        for s in op.seqs:
            self._known(s)
        finite = np.isfinite(q).all(axis=(1, 2))
        if not finite.all():  # answered with their most recent pages, whatever the policy (a non-finite score
            # would leave the scans' merges undefined); the others as usual
            if not self.nonfinite_queries:
                logger.warning("a query of sequence(s) %s has non-finite values: answered with their most recent "
                               "pages", [s for s, ok in zip(op.seqs, finite) if not ok])
            self.nonfinite_queries += int((~finite).sum())
        P, H, C = op.n_pages, self.H, self.C
        pages = np.full((B, H, P), -1, np.int32)
        slots = np.full((B, H, P, C), -1, np.int32) if op.want_slots else None
        t0 = time.perf_counter()
        indexes = [self.table.get(s, op.layer) for s in op.seqs]
        n_tokens = [idx.n_live if idx is not None else 0 for idx in indexes]
        live = [b for b in range(B) if n_tokens[b] and finite[b]]
        for b in range(B):
            if n_tokens[b] and not finite[b]:  # (the runtime may reuse it for a few steps, as any selection)
                pages[b], sl = select_baseline(indexes[b], q[b], P, "streaming")
                if slots is not None:
                    slots[b] = sl
        if op.policy != "icecache":  # the exact scan, or a baseline over the same tokens (evaluation)
            if op.policy in BATCHED_SCANS:  # one numba call per group: every (sequence, KV head) pair in parallel
                small = [b for b in live if n_tokens[b] * H * self.d < SERIAL_SCAN_ELEMENTS]
                long = [b for b in live if SERIAL_SCAN_ELEMENTS <= n_tokens[b] * H * self.d < LONGEST_BATCHED_ELEMENTS]
                groups = [(small, len(small) < SERIAL_BATCH_SEQUENCES)] if small else []
                if len(long) >= BATCHED_LONG_SEQUENCES:  # apart from the small ones: a static split of unequal
                    groups.append((long, False))  # work items would leave threads idle
                for group, one_thread in groups:
                    self._scan_together(group, one_thread, indexes, q, P, op, pages, slots)
                    live = sorted(set(live) - set(group))
            threads = numba.get_num_threads()
            try:
                for b in live:
                    served = indexes[b].lowrank.served if indexes[b].lowrank is not None else 0
                    small = n_tokens[b] * H * self.d < SERIAL_SCAN_ELEMENTS
                    numba.set_num_threads(1 if small else threads)  # per thread: this query's only
                    pages[b], sl = select_baseline(indexes[b], q[b], P, op.policy, op.merge,
                                                   self.store.keys[op.layer], layer=op.layer)
                    if slots is not None:
                        slots[b] = sl
                    if indexes[b].lowrank is not None:
                        self.lowrank_rows += indexes[b].lowrank.served - served
            finally:
                numba.set_num_threads(threads)
        else:
            if len(live) == 1:  # KV heads in parallel
                pages[live[0]] = indexes[live[0]].query(q[live[0]], P, params, merge=op.merge)
            elif live:  # one numba call: every (sequence, KV head) pair in parallel
                pages[live] = query_batch([indexes[b] for b in live], q[live], P, params, states=self.table.states,
                                          merge=op.merge)
            if slots is not None:
                for b in live:
                    slots[b] = indexes[b].page_positions(pages[b])  # an index's positions are key-store slots
        dt = (time.perf_counter() - t0) * 1e6
        self.queries += 1
        self.query_rows += B
        self.query_us_total += dt
        out = {"pages": pages}
        if slots is not None:
            out["slots"] = slots
        return p.QueryResult(n_tokens=n_tokens, search_us=dt), out

    def _scan_together(self, group: list[int], one_thread: bool, indexes, q, P: int, op: p.Query, pages, slots) -> None:
        """The exact scan of the query's sequences ``group`` in one numba call (``index/scan_batch.py``), on the
        query's thread alone or on up to one thread per (sequence, KV head) pair; their pages (and slots) filled in."""
        threads = numba.get_num_threads()
        numba.set_num_threads(1 if one_thread else min(threads, len(group) * self.H))
        try:
            pages[group], sl = scan_index_batch(self.table.states, [indexes[b] for b in group], q[group], P,
                                                merge=op.merge, store=self.store.keys[op.layer])
        finally:
            numba.set_num_threads(threads)
        if slots is not None:
            slots[group] = sl

    def _share_args(self, op: p.Share) -> tuple[int, int, int]:
        self._seq_id("src", op.src)
        self._seq_id("dst", op.dst)
        self._known(op.src)
        if op.src == op.dst:
            raise _bad("src and dst must differ")
        if op.prefix_len < 0:
            raise _bad(f"prefix_len must be >= 0, got {op.prefix_len}", "out_of_range")
        return op.src, op.dst, op.prefix_len

    def _release(self, op: p.Release, arrays, dtypes):
        return p.Done(tokens=[sum(self.table.release(s) for s in op.seqs)]), {}

    def _reset(self, op, arrays, dtypes):
        return p.Done(tokens=[self.table.reset()]), {}

    def _shutdown(self, op, arrays, dtypes):
        return p.Done(), {}

    def _stats(self, op, arrays, dtypes):
        return self.stats(), {}

    def stats(self) -> p.StatsResult:
        distinct = self.table.distinct()
        entries = [e for layers in self.table.seqs.values() for e in layers.values()]
        c = self.table.counters
        return p.StatsResult(
            sequences=len(self.table.seqs), layer_entries=len(entries), indexes=len(distinct),
            shared_entries=sum(1 for e in entries if e.refs > 1), tokens=sum(e.index.n_live for e in distinct),
            index_bytes=sum(e.index.nbytes() for e in distinct), state_slots=len(self.table.states), requests=self.requests, errors=self.errors,
            builds=c.builds, inserts=c.inserts, queries=self.queries, query_rows=self.query_rows, shares=c.shares,
            copies=c.copies, trims=c.trims, rebuilds=sum(e.index.rebuilds for e in distinct),
            indexed_tokens=c.indexed_tokens, expired=self.expired, numba_threads=numba.get_num_threads(),
            blas_threads=max(blas_threads().values(), default=0), lowrank_rows=self.lowrank_rows,
            lowrank_indexes=sum(1 for e in distinct if e.index.lowrank is not None and e.index.lowrank.active is not None),
            lowrank_bytes=sum(e.index.lowrank.nbytes() for e in distinct if e.index.lowrank is not None),
            query_us_total=self.query_us_total, busy_us_total=self.busy_us_total,
            nonfinite_queries=self.nonfinite_queries)
