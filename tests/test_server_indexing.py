"""The default ``while_indexing: dense`` through a real SGLang server on CPU (tiny Llama): a decode step
whose selections would queue behind unanswered index writes (a new request's first index, earlier writes
not answered yet) attends to every token instead of waiting, so a long prompt's first tokens are not held
back by its index; once the indexer has caught up, decoding is sparse. A stopped indexer is still found
and replaced while steps attend densely (the supervisor's stuck detection gets the same late steps a
waiting step would give it)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
from sglang_servers import TINY_ICE, icecache_args, server_fixture

from icecache_sglang.models.tiny import ensure_tiny_model

pytestmark = pytest.mark.slow

DEFAULT = {k: v for k, v in TINY_ICE.items() if k != "while_indexing"} | {"selection_deadline_ms": 300}
tiny_default = server_fixture("tiny_while_indexing", ensure_tiny_model, icecache_args(DEFAULT))


def token_ids(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(100, 40000), k=n)


def delta(a: dict, b: dict, key: str):
    return b.get(key, 0) - a.get(key, 0)


def test_first_steps_attend_densely_while_the_index_is_built_then_sparsely(tiny_default):
    a = tiny_default.icecache_stats(wait_s=0)
    r = tiny_default.generate(input_ids=token_ids(16000, 1), max_new_tokens=48, ignore_eos=True)
    assert r["meta_info"]["completion_tokens"] == 48
    b = tiny_default.icecache_stats()
    # the first step sends the request's index: it and every step until the indexer answers are dense
    assert delta(a, b, "dense_while_indexing_rows") >= 1, b
    # no step waited for the build: the only writes waited for are the page-size blocks of recent tokens
    # sparse steps add to the index (milliseconds)
    assert delta(a, b, "write_wait_s_total") < 0.25, b
    assert delta(a, b, "sparse_rows") >= 1, b  # then sparse over sink + selected pages + recent tokens
    assert delta(a, b, "sparse_rows") + delta(a, b, "dense_while_indexing_rows") == 48 - 1, b  # every step
    assert b["fallbacks"] == a["fallbacks"], b


def test_a_stopped_indexer_is_replaced_while_steps_attend_densely(tiny_default):
    a = tiny_default.icecache_stats(wait_s=0)
    pid = int(a["indexer_pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        # its index is never answered: every step attends densely; the steps after the time a waiting step
        # would have given the build (deadline + allowance, ~0.8 s here) count towards stuck
        r = tiny_default.generate(input_ids=token_ids(2000, 2), max_new_tokens=400, ignore_eos=True)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert r["meta_info"]["completion_tokens"] == 400
    deadline = time.monotonic() + 120
    while True:
        b = tiny_default.icecache_stats(wait_s=0.5)
        if b["indexer_state"] == "up" and int(b["indexer_pid"]) != pid:
            break
        assert time.monotonic() < deadline, b
        tiny_default.generate(input_ids=token_ids(12, 3), max_new_tokens=2)  # the supervisor acts at passes
    assert delta(a, b, "stuck_kills") == 1, b
    assert delta(a, b, "dense_while_indexing_rows") >= 1, b
    # and the replacement serves: a new long request decodes sparsely again
    r = tiny_default.generate(input_ids=token_ids(3000, 4), max_new_tokens=40, ignore_eos=True)
    c = tiny_default.icecache_stats()
    assert delta(b, c, "sparse_rows") >= 1, c


# a slow index (half the tokens on level 1: the exact parent search is quadratic) makes a long prompt's build
# take seconds on 2 cores, while a running request's steps take milliseconds
tiny_slow_build = server_fixture("tiny_slow_build", ensure_tiny_model,
                                 icecache_args(DEFAULT | {"index": {"p0": 0.5}}))


def test_a_new_prompts_build_holds_back_only_its_own_request(tiny_slow_build):
    srv = tiny_slow_build
    a0 = srv.icecache_stats(wait_s=0)
    out = {}
    running = threading.Thread(target=lambda: out.setdefault("a", srv.generate(
        input_ids=token_ids(2000, 5), max_new_tokens=1500, ignore_eos=True)))
    running.start()
    deadline = time.monotonic() + 120
    while True:  # the running request decodes sparsely: its own index is built
        s1 = srv.icecache_stats(wait_s=0.2)
        if delta(a0, s1, "sparse_rows") >= 5:
            break
        assert time.monotonic() < deadline and running.is_alive(), s1
    r = srv.generate(input_ids=token_ids(24000, 6), max_new_tokens=6, ignore_eos=True)
    # a snapshot published after the new request's last step (every SNAPSHOT_EVERY_S = 0.5 s: one read at
    # once missed its last steps, 4 sparse rows of 5 counted), so a few steps of the running one alone too
    s2 = srv.icecache_stats(wait_s=0.6)
    running.join(timeout=600)
    assert r["meta_info"]["completion_tokens"] == 6 and out["a"]["meta_info"]["completion_tokens"] == 1500
    # only the new request's own steps waited for its index (its 5 decode steps at most: the build outlasts
    # them); the running request, in the batch at each of them, kept selecting pages meanwhile. Before, each
    # of those steps held back both rows (10).
    assert delta(s1, s2, "dense_while_indexing_rows") <= 5, s2
    assert delta(s1, s2, "sparse_rows") >= 5, s2
