"""Supervision of one TP rank's indexer process: health, restarts off the scheduler's thread, stuck detection.

A fault in the indexer costs selection quality, never the scheduler: while the indexer is not serving,
selections fall back to each request's most recent pages at once (no waiting), index writes go to the
client's ledger only, and every request completes. States:

- ``up``: the indexer answers; decode steps wait for selections up to the step's deadline.
- ``restarting``: a replacement process is starting in a background thread (spawn, numba load, ready
  report); the scheduler keeps decoding on fallbacks.
- ``rebuilding``: the replacement is connected and replays the ledger (every sequence's builds); queries
  are sent but not waited for until the replay is acknowledged.
- ``down``: the restart budget (``max_restarts`` in ``restart_window_s``, config keys; 5 in 10 minutes by
  default) is spent, or the last replacement failed; a restart is tried again at the first forward pass after the window frees one.

What triggers a restart, checked at every forward pass (:meth:`poll`) and after every decode step
(:meth:`step_finished`):

- the process died (SIGKILL, a crash);
- writes were lost while no indexer was connected (the indexer no longer holds what the ledger says);
- it is **stuck**: ``STUCK_STEPS`` consecutive decode steps passed their deadline, and in that time it
  answered nothing and used no CPU (or is in the stopped state), or it has been silent for ``SILENCE_S``.
  An indexer that is merely slow (it still answers late, or burns CPU on a long build) is left alone:
  its late answers are dropped and selections fall back, which a restart (a replay of everything) would
  only make worse.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from ..indexer.launcher import Indexer, IndexerProcess
from .metrics import IceCacheMetrics

logger = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0
STUCK_STEPS = 3
SILENCE_S = 60.0
#: how long a replacement may take to come up (numba's cache is warm by then: seconds, not minutes)
RESTART_READY_TIMEOUT_S = 300.0
#: CPU seconds an indexer must use across the timed-out steps to count as working rather than stuck
MIN_PROGRESS_CPU_S = 0.02

UP, RESTARTING, REBUILDING, DOWN = "up", "restarting", "rebuilding", "down"


class _Replacement(threading.Thread):
    """Waits for a replacement's ready report (its numba load takes seconds) away from the scheduler's
    thread. The process itself is spawned by the scheduler's thread, which outlives it: a child's
    parent-death signal fires when the thread that forked it ends."""

    def __init__(self, process: IndexerProcess):
        super().__init__(name="icecache-indexer-restart", daemon=True)
        self.process = process
        self.error: BaseException | None = None
        try:
            process.spawn()
        except BaseException as e:  # noqa: BLE001 - reported by poll() like any failed start
            self.error = e

    def run(self) -> None:
        if self.error is not None:
            return
        try:
            self.process.wait_ready(timeout_s=RESTART_READY_TIMEOUT_S)
        except BaseException as e:  # noqa: BLE001 - reported to the scheduler's thread by poll()
            self.error = e


class IndexerSupervisor:
    """Owns the rank's :class:`Indexer`; driven by the scheduler's thread (not thread-safe)."""

    def __init__(self, indexer: Indexer, metrics: IceCacheMetrics | None = None, *, max_restarts: int = MAX_RESTARTS,
                 restart_window_s: float = RESTART_WINDOW_S):
        self.indexer = indexer
        self.metrics = metrics if metrics is not None else IceCacheMetrics()
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.state, self.reason = UP, ""
        self._attempts: deque[float] = deque()
        self._pending: _Replacement | None = None
        self._replay_last_rid = 0
        self._late_steps = 0
        self._late_cpu0: float | None = None
        self._late_replies0 = 0

    @property
    def client(self):
        return self.indexer.client

    @property
    def serving(self) -> bool:
        """Whether decode steps should wait for the indexer's answers."""
        return self.state == UP

    # ------------------------------------------------------------------ checks
    def poll(self) -> None:
        """Once per forward pass: adopt a finished replacement, notice death, lost writes, a spent window.
        Never raises: an unexpected error leaves the indexer down (fallback selections), not the scheduler."""
        try:
            self._poll()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def step_finished(self, timed_out: bool) -> None:
        """After a decode step: count consecutive steps past their deadline; kill a stuck indexer."""
        try:
            self._step_finished(timed_out)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        logger.exception("IceCache: indexer supervision failed; the indexer is treated as down: %s", e)
        self._pending = None
        self._set(DOWN, f"supervision error: {type(e).__name__}: {e}")

    def _poll(self) -> None:
        if self._pending is not None:
            if not self._pending.is_alive():
                self._finish_restart()
            return
        if self.state == REBUILDING:
            if not self.indexer.process.is_alive():
                self._begin_restart("the replacement indexer died while rebuilding")
            elif self.client.diverged:
                self._begin_restart("index writes were lost while rebuilding")
            elif self.client.acked_through(self._replay_last_rid):
                self._set(UP, "")
                logger.warning("IceCache indexer (rank %d) rebuilt from the ledger; selections are served again",
                               self.indexer.config.rank)
            return
        if self.state == DOWN:
            if self._budget_left():
                self._begin_restart(self.reason or "retrying")
            return
        proc = self.indexer.process
        if not proc.is_alive():
            code = proc.proc.exitcode if proc.proc is not None else None
            self._begin_restart(f"the indexer process is dead (exit code {code})")
        elif self.client.diverged:
            self._begin_restart("index writes were lost while no indexer was connected")

    def _step_finished(self, timed_out: bool) -> None:
        if not timed_out or self.state != UP:
            self._late_steps = 0
            return
        proc = self.indexer.process
        if self._late_steps == 0:
            self._late_cpu0, self._late_replies0 = proc.cpu_seconds(), self.client.counters.replies
        self._late_steps += 1
        self.metrics.timed_out_steps += 1
        if self._late_steps < STUCK_STEPS:
            return
        why = self._stuck_reason(proc)
        if why:
            self.metrics.stuck_kills += 1
            self._begin_restart(f"the indexer is stuck: {why}")

    def _stuck_reason(self, proc: IndexerProcess) -> str:
        silent_s = time.monotonic() - self.client.last_reply_at
        if silent_s > SILENCE_S:
            return f"no answer for {silent_s:.0f} s"
        if self.client.counters.replies != self._late_replies0:
            return ""  # slow, but answering
        if proc.stopped():
            return f"stopped, {self._late_steps} steps without an answer"
        cpu = proc.cpu_seconds()
        if cpu is not None and self._late_cpu0 is not None and cpu - self._late_cpu0 < MIN_PROGRESS_CPU_S:
            return f"{self._late_steps} steps without an answer and without using CPU"
        return ""

    # ------------------------------------------------------------------ restarts
    def _budget_left(self) -> bool:
        now = time.monotonic()
        while self._attempts and now - self._attempts[0] > self.restart_window_s:
            self._attempts.popleft()
        return len(self._attempts) < self.max_restarts

    def _begin_restart(self, reason: str) -> None:
        self._late_steps = 0
        rank = self.indexer.config.rank
        self.indexer.process.kill()  # dead, stuck or out of sync: it is replaced either way
        if not self._budget_left():
            if self.state != DOWN:
                logger.error("IceCache indexer (rank %d) is down (%s) and %d restarts were used in the last %.0f s; "
                             "decoding continues on fallback selections until a restart is allowed again",
                             rank, reason, self.max_restarts, self.restart_window_s)
            self._set(DOWN, reason)
            return
        self._attempts.append(time.monotonic())
        logger.warning("IceCache indexer (rank %d): %s; restarting (%d in the last %.0f s); decoding continues on "
                       "fallback selections meanwhile", rank, reason, len(self._attempts), self.restart_window_s)
        self._pending = _Replacement(self.indexer.replacement())
        self._pending.start()
        self._set(RESTARTING, reason)

    def _finish_restart(self) -> None:
        rep, self._pending = self._pending, None
        rank = self.indexer.config.rank
        if rep.error is None:
            try:
                self.indexer.adopt(rep.process, ping_timeout_s=5.0)
                self._replay_last_rid = self.client.last_rid
                self.metrics.indexer_restarts += 1
                self._set(REBUILDING, "replaying the ledger")
                self._poll()  # an empty ledger is rebuilt at once
                return
            except Exception as e:  # noqa: BLE001 - a replacement that does not answer counts as failed
                rep.error = e
        rep.process.kill()
        self.metrics.failed_restarts += 1
        first_line = str(rep.error).strip().splitlines()[-1] if str(rep.error).strip() else type(rep.error).__name__
        logger.error("IceCache indexer (rank %d) restart failed: %s", rank, first_line)
        self._set(DOWN, f"restart failed: {first_line}")

    def _set(self, state: str, reason: str) -> None:
        self.state, self.reason = state, reason
        self.metrics.indexer_up = int(state == UP)

    # ------------------------------------------------------------------ reporting and shutdown
    def status(self) -> dict:
        proc = self.indexer.process
        return {"state": self.state, "reason": self.reason, "pid": proc.pid, "endpoint": self.indexer.config.endpoint,
                "restarts_in_window": len(self._attempts), "max_restarts": self.max_restarts,
                "restart_window_s": self.restart_window_s}

    def close(self) -> None:
        rep, self._pending = self._pending, None
        if rep is not None:
            rep.join(10.0)
            rep.process.kill()
        self.indexer.close()
