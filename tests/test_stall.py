"""The stall report (runtime/stall.py) on real threads: a thread held on one 'forward pass' past the limit is
reported with its stack, again while it lasts; a thread that keeps moving, or has no batch, is not."""

from __future__ import annotations

import threading
import time

import pytest

from icecache_sglang.runtime.stall import StallReporter


class Loop:
    """A stand-in scheduler thread: counts passes; ``hold`` keeps it inside one pass."""

    def __init__(self):
        self.counter, self.active = 0, True
        self.release = threading.Event()
        self.release.set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            self.counter += 1
            self._pass_that_may_hang()

    def _pass_that_may_hang(self):
        self.release.wait()
        time.sleep(0.005)


def reporter(loop: Loop, after_s: float):
    lines = []
    rep = StallReporter(thread_id=loop.thread.ident, get_counter=lambda: loop.counter,
                        is_active=lambda: loop.active, after_s=after_s, log=lines.append)
    return rep, lines


def test_a_held_pass_is_reported_with_the_threads_stack_and_again_while_it_lasts():
    loop = Loop()
    rep, lines = reporter(loop, 0.2)
    try:
        time.sleep(0.5)
        assert lines == []  # moving: nothing to say
        loop.release.clear()
        time.sleep(0.75)
        assert 2 <= len(lines) <= 4, lines
        assert "has been on one forward pass" in lines[0] and "_pass_that_may_hang" in lines[0]
        loop.release.set()
        time.sleep(0.3)
        n = len(lines)
        time.sleep(0.5)
        assert len(lines) == n  # moving again: quiet
    finally:
        loop.release.set()
        loop.stop.set()
        rep.close()


def test_an_idle_scheduler_is_not_a_stall():
    loop = Loop()
    loop.active = False
    loop.release.clear()
    rep, lines = reporter(loop, 0.1)
    try:
        time.sleep(0.5)
        assert lines == []
    finally:
        loop.release.set()
        loop.stop.set()
        rep.close()


def test_the_limit_must_be_positive():
    with pytest.raises(ValueError):
        StallReporter(thread_id=threading.get_ident(), get_counter=lambda: 0, is_active=lambda: True, after_s=0)
