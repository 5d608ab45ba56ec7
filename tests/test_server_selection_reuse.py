"""Selections reused across decode steps (``step_reuse``, ``max_stale_steps``: runtime/selection_cache.py)
through a real SGLang server on CPU with the tiny random Llama: the staleness bound, what a reused
selection attends to, dropped queries of finished requests, and a stopped indexer during asynchronous
decoding."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
from sglang_servers import TINY_ICE, icecache_args, server_fixture

from icecache_sglang.models.tiny import ensure_tiny_model

pytestmark = pytest.mark.slow

tiny_reuse = server_fixture("tiny_ice_shared", ensure_tiny_model, icecache_args(TINY_ICE), shared=True)
ANCHORS = 4  # the tiny model's layers (dense_layers 0, layer_reuse 1)


def prompt(n: int, seed: int) -> list[int]:
    import random

    return random.Random(seed).choices(range(100, 30000), k=n)


def run(server, settings: dict, ids: list[int], new_tokens: int) -> tuple[dict, dict, dict]:
    """One request under ``settings``, indexed afresh (the radix cache flushed: no index reused)."""
    server.set_icecache(**settings)
    server.get("/flush_cache")
    before = server.icecache_stats(wait_s=0)
    out = server.generate(input_ids=ids, max_new_tokens=new_tokens, ignore_eos=True)
    after = server.icecache_stats()
    return out, before, after


def delta(after: dict, before: dict, key: str):
    return after[key] - before.get(key, 0)


@pytest.fixture
def reset(tiny_reuse):
    yield tiny_reuse
    tiny_reuse.set_icecache(step_reuse=1, max_stale_steps=0, selection_deadline_ms=500, while_indexing="wait",
                            token_rerank=1)


def test_token_rerank_attends_the_budget_among_more_candidate_pages(reset):
    """``token_rerank: 2``: every anchor layer of every sparse step re-ranks the tokens of twice the budget's
    pages by its own queries and attends to no more than the budget, also with reused selections (whose
    tokens are ranked by the current step's queries)."""
    server = reset
    ids = prompt(1500, 8)
    plain, b0, a0 = run(server, {}, ids, 24)
    pages0 = delta(a0, b0, "pages_selected_total") / delta(a0, b0, "decode_steps")
    layers, C, token_bytes = ANCHORS, TINY_ICE["page_size"], 2 * 2 * 32 * 4  # K+V, 2 KV heads, head_dim 32, f32
    bound = layers * (TINY_ICE["budget_tokens"] + C - 1) * token_bytes
    for settings in ({"token_rerank": 2}, {"token_rerank": 2, "max_stale_steps": 2}):
        out, b, a = run(server, settings, ids, 24)
        steps = delta(a, b, "decode_steps")
        assert out["meta_info"]["completion_tokens"] == 24 and delta(a, b, "fallbacks") == 0
        assert delta(a, b, "reranked_selections") == ANCHORS * steps, settings  # one request, every anchor, step
        assert 0 < a["attended_kv_bytes_last"] <= bound  # the budget, not the candidates
        # pages attended, in pages' worth of kept tokens: the budget's, not the candidates'
        assert delta(a, b, "pages_selected_total") / steps <= 1.05 * pages0 + ANCHORS
    assert delta(a, b, "reused_selections") > 0
    with pytest.raises(ValueError, match="token_rerank must be an integer in"):
        server.set_icecache(token_rerank=0)


def test_step_reuse_selects_every_k_steps_and_reuses_in_between(reset):
    server = reset
    ids = prompt(700, 1)
    sync, b0, a0 = run(server, {}, ids, 24)
    assert delta(a0, b0, "reused_selections") == 0
    out, b, a = run(server, {"step_reuse": 4}, ids, 24)
    steps = delta(a, b, "decode_steps")
    assert out["meta_info"]["completion_tokens"] == 24
    # one query per anchor layer every 4th step (the first sparse step included), reused at the 3 between
    assert delta(a, b, "queries") == ANCHORS * -(-steps // 4)
    assert delta(a, b, "reused_selections") == ANCHORS * (steps - -(-steps // 4))
    assert a["selection_age_steps_max"] == 3 and delta(a, b, "fallbacks") == 0
    # k = 1 is the synchronous mode: the same tokens as the default
    again, b1, a1 = run(server, {"step_reuse": 1}, ids, 24)
    assert again["output_ids"] == sync["output_ids"]
    assert delta(a1, b1, "reused_selections") == 0


def test_asynchronous_selection_honours_the_staleness_bound(reset):
    server = reset
    out, b, a = run(server, {"max_stale_steps": 2}, prompt(900, 2), 40)
    steps = delta(a, b, "decode_steps")
    assert out["meta_info"]["completion_tokens"] == 40 and steps >= 38
    assert delta(a, b, "fallbacks") == 0
    assert delta(a, b, "reused_selections") > 0  # selections answered after their layer ran were used later
    assert 1 <= a["selection_age_steps_max"] <= 2
    # about one query per anchor layer and step: never more than one in flight per request and layer
    assert delta(a, b, "queries") <= ANCHORS * steps
    # the finished request's queries were read or dropped (a new step prunes them): nothing leaks
    server.generate(input_ids=prompt(400, 3), max_new_tokens=3)
    assert server.icecache_stats()["queries_in_flight"] <= ANCHORS


def test_asynchronous_selection_fetches_a_requests_first_selections_while_it_decodes_densely(reset):
    """With ``while_indexing: dense`` a request attends densely until its index is answered, then for one
    more step whose anchor layers send its first queries (through SGLang's dense path, no row of the step
    being sparse) without waiting; its first sparse step attends with those answers."""
    server = reset
    out, b, a = run(server, {"max_stale_steps": 2, "while_indexing": "dense"}, prompt(900, 4), 24)
    assert out["meta_info"]["completion_tokens"] == 24
    assert delta(a, b, "primed_rows") >= 1 and delta(a, b, "fallbacks") == 0
    assert delta(a, b, "sparse_rows") > 0 and delta(a, b, "reused_selections") > 0


def test_a_stopped_indexer_during_asynchronous_decoding_costs_fallbacks_then_recovers(reset):
    server = reset
    server.set_icecache(max_stale_steps=2, selection_deadline_ms=300)
    server.generate(input_ids=prompt(600, 5), max_new_tokens=4)  # an index, and the indexer warm
    pid = server.icecache_stats()["indexer_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        before = server.icecache_stats(wait_s=0)
        t0 = time.monotonic()
        out = server.generate(input_ids=prompt(600, 6), max_new_tokens=12, ignore_eos=True)
        assert out["meta_info"]["completion_tokens"] == 12
        assert time.monotonic() - t0 < 60
    finally:
        with contextlib.suppress(ProcessLookupError):  # the supervisor may have replaced it as stuck
            os.kill(pid, signal.SIGCONT)
    st = server.icecache_stats()
    assert st["fallbacks"] > before["fallbacks"]
    # later requests select again (the stopped indexer was replaced, or answered again once continued)
    deadline = time.monotonic() + 60
    while True:
        b = server.icecache_stats(wait_s=0)
        server.generate(input_ids=prompt(600, 7), max_new_tokens=8)
        a = server.icecache_stats()
        if delta(a, b, "fallbacks") == 0 and delta(a, b, "queries") > 0:
            break
        assert time.monotonic() < deadline, server.tail(40)


tiny_streaming = server_fixture("tiny_streaming", ensure_tiny_model,
                                icecache_args({**TINY_ICE, "max_stale_steps": 4}, "--enable-streaming-session"))


def test_a_streaming_sessions_next_turn_selects_anew(tiny_streaming):
    """A streaming session's next turn runs on the same ``req_to_token`` row, its index extended by the new
    prompt. Its first steps must not reuse the previous turn's selections (still within the staleness bound
    by steps: no decode step ran between the turns): those would attend their old pages and the whole new
    prompt in full. Every step attends within the budget, each turn completes."""
    server = tiny_streaming
    sid = server.post("/open_session", {"capacity_of_str_len": 100_000, "streaming": True})
    sid = sid if isinstance(sid, str) else sid.get("session_id", sid.get("text"))
    layers, C, token_bytes = ANCHORS, TINY_ICE["page_size"], 2 * 2 * 32 * 4  # K+V, 2 KV heads, head_dim 32, f32
    bound = layers * (TINY_ICE["budget_tokens"] + C - 1 + 4) * token_bytes  # a reused selection: 4 steps of tail
    before = server.icecache_stats(wait_s=0)
    for turn in range(3):
        out = server.post("/generate", {"input_ids": prompt(1200, 40 + turn), "session_params": {"id": sid},
                                        "sampling_params": {"max_new_tokens": 16, "temperature": 0.0,
                                                            "ignore_eos": True}})
        assert out["meta_info"]["completion_tokens"] == 16, out
    st = server.icecache_stats()
    assert delta(st, before, "decode_steps") > 0 and delta(st, before, "reused_selections") > 0
    assert st["attended_kv_bytes_max"] <= bound, (st["attended_kv_bytes_max"], bound)
    assert st["tracker"]["live"] <= 1  # one row for the whole session
    server.post("/close_session", {"session_id": sid})
