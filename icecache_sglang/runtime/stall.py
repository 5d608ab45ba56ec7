"""A slow scheduler, said in the log with where it is: ``StallReporter`` watches one thread (the scheduler's)
and, when it has been busy on one forward pass for ``after_s`` seconds, logs that thread's Python stack.

SGLang's own watchdog acts only after ``--watchdog-timeout`` (300 s) and then kills the server; its soft
watchdog needs ``py-spy`` and the right to attach to the process. This one reads the stack from inside the
process (``sys._current_frames``), so a prefill chunk that takes a minute on a GPU machine shows, in the
server's log, the line it is waiting in. It reports once when a stall passes ``after_s`` and again every
``after_s`` while it goes on, each time with the stack as it is then. It imports nothing from SGLang: the
caller passes the scheduler's forward-pass counter and whether it has a batch (``patches/scheduler.py``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

logger = logging.getLogger(__name__)


class StallReporter:
    def __init__(self, *, thread_id: int, get_counter: Callable[[], int], is_active: Callable[[], bool],
                 after_s: float, name: str = "scheduler", log: Callable[[str], None] | None = None,
                 max_frames: int = 40):
        if not after_s > 0:
            raise ValueError(f"after_s must be > 0, got {after_s!r}")
        self.thread_id, self.get_counter, self.is_active = thread_id, get_counter, is_active
        self.after_s, self.name, self.max_frames = after_s, name, max_frames
        self.log = log or logger.warning
        self.reports = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="icecache-stall", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2.0)

    def stack(self) -> str:
        frame = sys._current_frames().get(self.thread_id)
        if frame is None:
            return "(thread gone)"
        return "".join(traceback.format_stack(frame)[-self.max_frames:])

    def _run(self) -> None:
        last_counter, since, reported = None, time.monotonic(), 0
        tick = min(1.0, self.after_s / 4)
        while not self._closed.wait(tick):
            try:
                counter, active = self.get_counter(), self.is_active()
            except Exception:  # noqa: BLE001 - the scheduler is being torn down
                continue
            now = time.monotonic()
            if counter != last_counter or not active:
                last_counter, since, reported = counter, now, 0
                continue
            stuck = now - since
            if stuck >= self.after_s * (reported + 1):
                reported += 1
                self.reports += 1
                self.log(f"IceCache: the {self.name} has been on one forward pass (#{counter}) for {stuck:.1f} s; "
                         f"its stack:\n{self.stack()}")
