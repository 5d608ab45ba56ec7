"""From request frames to reply frames: :func:`answer` in the caller's thread, and :class:`Dispatcher`, which the
socket loop uses so that a long Build does not hold up other sequences.

The dispatcher indexes large Builds and Inserts, and Shares that cut a long prefix, on background threads
(spreading their layers over the service's write workers) and answers everything else on the loop's thread at once (a decode step's small
Insert included: it takes milliseconds, less than a hand-over to another thread), except a request that
must see an earlier request's effect: one that names a sequence a waiting or running request names, or one
that concerns every sequence (Reset, Shutdown) while anything waits or runs. Those wait, in arrival order.
So a query for another sequence is answered, and another sequence's decode Inserts are indexed, while a
prompt's index is being built; a query for the sequence being written is answered right after the write.
Replies can therefore leave in another order than their requests came; the client matches them by id.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import traceback
from collections import deque

import numba

from . import protocol as p

logger = logging.getLogger("icecache.indexer")

#: every sequence: a request that must wait for everything before it, and that everything after waits for
EVERY = None
#: writes indexed at once (on different sequences): a long Build does not hold up other sequences' Inserts
WRITER_THREADS = 4
WRITES = (p.Build, p.Insert)
#: requests that may run on a background thread (:meth:`IndexerService.in_background` says which do)
BACKGROUND = (p.Build, p.Insert, p.Share)


def sequences_of(op) -> frozenset[int] | None:
    """The sequences a request reads or changes (``EVERY`` for all of them)."""
    if isinstance(op, WRITES):
        return frozenset((op.seq,))
    if isinstance(op, p.Query):
        return frozenset(op.seqs)
    if isinstance(op, p.Share):
        return frozenset((op.src, op.dst))
    if isinstance(op, p.Release):
        return frozenset(op.seqs)
    if isinstance(op, (p.Ping, p.Stats)):
        return frozenset()
    return EVERY  # Reset, Shutdown, and anything new: the safe default


def _conflict(a: frozenset[int] | None, b: frozenset[int] | None) -> bool:
    return a is EVERY or b is EVERY or bool(a & b)


def decode(service, body: list):
    """``(request, arrays)``, or the error reply frames for a message that cannot be read."""
    try:
        return p.decode_request(body)
    except p.ProtocolError as e:
        service.count_error(new_request=True)
        return p.encode_error(getattr(e, "rid", -1), e.code, str(e))
    except Exception as e:  # noqa: BLE001 - decode_request maps every decoding problem to ProtocolError; this is a bug
        logger.error("internal error while decoding: %s", traceback.format_exc())
        service.count_error(new_request=True)
        return p.encode_error(-1, "internal", f"{type(e).__name__}: {e}")


def reply(service, req: p.Request, fn) -> list:
    """The reply frames of ``fn() -> (result, arrays)``, or of the error it raised. Never raises."""
    try:
        result, out = fn()
        return p.encode_reply(req.id, result, out)
    except p.ProtocolError as e:
        return p.encode_error(req.id, e.code, str(e))
    except Exception as e:  # noqa: BLE001 - a bug must not take the indexer down: report it and keep serving
        logger.error("internal error on %s: %s", type(req.op).__name__, traceback.format_exc())
        service.count_error()
        return p.encode_error(req.id, "internal", f"{type(e).__name__}: {e}")


def answer(service, body: list) -> tuple[list, bool]:
    """Reply frames for one request, answered in this thread, and whether it asked us to stop. Never raises."""
    got = decode(service, body)
    if isinstance(got, list):
        return got, False
    req, arrays = got
    return reply(service, req, lambda: service.handle(req, arrays)), isinstance(req.op, p.Shutdown)


class Dispatcher:
    """Requests in, ``(route, reply_frames, stop)`` out (:meth:`accept`, then :meth:`ready`); see the module."""

    def __init__(self, service):
        self.service = service
        self._threads_each = numba.get_num_threads()  # the loop thread's numba threads: the writers get as many
        self._stopping = False
        self._backlog: deque = deque()  # (route, request, arrays), arrival order
        self._running: dict[int, tuple] = {}  # key -> (route, request, PendingWrite)
        self._keys = itertools.count()
        self._out: list = []
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._write_loop, name=f"icecache-writer-{i}", daemon=True)
                         for i in range(WRITER_THREADS)]
        for t in self._threads:
            t.start()

    @property
    def busy(self) -> bool:
        """A write is running or a request waits: the loop should look for finished work often."""
        return bool(self._running) or bool(self._backlog)

    def accept(self, route, body: list) -> None:
        got = decode(self.service, body)
        if isinstance(got, list):
            self._out.append((route, got, False))
            return
        req, arrays = got
        if self._stopping:  # after a Shutdown: nothing more starts, nobody reads the replies
            return
        if self._must_wait(req, len(self._backlog)):
            self._backlog.append((route, req, arrays))
        else:
            self._start(route, req, arrays)

    def ready(self) -> list:
        """Replies ready to send: finished writes, and what could start after them."""
        while True:
            try:
                key = self._done.get_nowait()
            except queue.Empty:
                break
            route, req, pending = self._running.pop(key)
            self._out.append((route, reply(self.service, req, lambda: self.service.finish_write(pending)), False))
            self._drain()
        out, self._out = self._out, []
        return out

    def close(self) -> None:
        for _ in self._threads:
            self._todo.put(None)

    # ------------------------------------------------------------------ internals
    def _must_wait(self, req: p.Request, ahead: int) -> bool:
        """Whether ``req`` must wait for the running write or for one of the first ``ahead`` waiting requests."""
        mine = sequences_of(req.op)
        if mine is not EVERY and not mine:
            return False
        return (any(_conflict(mine, sequences_of(r.op)) for _, r, _ in self._running.values())
                or any(_conflict(mine, sequences_of(self._backlog[i][1].op)) for i in range(ahead)))

    def _start(self, route, req: p.Request, arrays) -> None:
        if not isinstance(req.op, BACKGROUND):
            self._stopping = isinstance(req.op, p.Shutdown)
            self._out.append((route, reply(self.service, req, lambda: self.service.handle(req, arrays)),
                              self._stopping))
            return
        try:
            pending = self.service.begin_write(req, arrays)
        except Exception as e:  # noqa: BLE001 - a refused write is answered at once
            refused = e
            self._out.append((route, reply(self.service, req, lambda: _raise(refused)), False))
            return
        if not self.service.in_background(pending):  # small: here, now
            pending.run()
            self._out.append((route, reply(self.service, req, lambda: self.service.finish_write(pending)), False))
            return
        key = next(self._keys)
        self._running[key] = (route, req, pending)
        self._todo.put((key, pending))

    def _drain(self) -> None:
        """Start, in arrival order, every waiting request that no earlier one holds back."""
        i = 0
        while i < len(self._backlog) and not self._stopping:
            route, req, arrays = self._backlog[i]
            if self._must_wait(req, i):
                i += 1
                continue
            del self._backlog[i]
            self._start(route, req, arrays)

    def _write_loop(self) -> None:
        numba.set_num_threads(self._threads_each)  # per thread: a new thread would use every core
        while True:
            job = self._todo.get()
            if job is None:
                return
            key, pending = job
            pending.run()
            self._done.put(key)


def _raise(e: BaseException):
    raise e
