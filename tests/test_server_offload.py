"""The offloaded decode through real SGLang servers on CPU (``offload: true``): decode attention reads only
the fixed-size device pool (``runtime/pool/device_pool.py``; on a machine without a GPU a second tensor in
RAM), filled from SGLang's KV pool. Its answers are token for token those of IceCache without offload (the
same selections over the same keys, attended from device rows instead of the pool), while sessions whose
contexts add up to many times the device pool run through it, the pool's size never changes and every lane
is returned when requests end."""

from __future__ import annotations

import random
import threading

import pytest
from sglang_servers import TINY_ICE, icecache_args, server_fixture

from icecache_sglang.models.tiny import ensure_tiny_model
from icecache_sglang.runtime.config import IceCacheConfig

pytestmark = pytest.mark.slow

LANES = 3
LANE_ROWS = IceCacheConfig(**TINY_ICE).lane_rows  # 128 + 16
HOST_KV_GB = 0.05  # SGLang's KV pool in host memory: 0.05 GiB / 2048 bytes per token = 26214 tokens
OFFLOAD = {**TINY_ICE, "offload": True, "device_kv_tokens": LANES * LANE_ROWS, "host_kv_gb": HOST_KV_GB}
ROW_BYTES = (32 + 32) * 4  # tiny model: head_dim 32, K and V, float32
LAYERS, KV_HEADS = 4, 2
TOKEN_BYTES = LAYERS * KV_HEADS * ROW_BYTES

tiny_ref = server_fixture("tiny_ice_shared", ensure_tiny_model, icecache_args(TINY_ICE), shared=True)
CONTEXT = 4096  # the offload server's context length: its prefill staging buffer holds one such request
tiny_offload = server_fixture("tiny_offload", ensure_tiny_model, icecache_args(OFFLOAD, "--context-length", str(CONTEXT)))


def token_ids(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(100, 40000), k=n)


def answer(srv, ids, max_new=24) -> list[int]:
    r = srv.generate(input_ids=ids, max_new_tokens=max_new, ignore_eos=True)
    return r["output_ids"]


def answer_all(srv, jobs: list[list[int]], max_new: int) -> list[list[int] | None]:
    """Every prompt of ``jobs`` at once (one thread each); each one's output ids (None if it did not return)."""
    got: list = [None] * len(jobs)

    def one(i):
        got[i] = answer(srv, jobs[i], max_new)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return got


def test_offloaded_decode_answers_like_icecache_without_offload(tiny_ref, tiny_offload):
    for n, seed in ((60, 1), (400, 2), (1500, 3), (3000, 4)):  # within the budget, then 3x-23x beyond it
        ids = token_ids(n, seed)
        assert answer(tiny_offload, ids) == answer(tiny_ref, ids), n
    st = tiny_offload.icecache_stats()
    assert st["device_lanes"] == LANES
    assert st["device_kv_bytes"] == 2 * LAYERS * (1 + LANES * LANE_ROWS) * KV_HEADS * 32 * 4  # K and V, row 0 padding
    assert st["device_rows_loaded"] > 0 and st["device_rows_hit"] > 0
    # consecutive steps attend mostly the same rows: far fewer rows move than are attended
    assert st["device_rows_hit"] > 3 * st["device_rows_loaded"], st
    assert st["device_kv_bytes_loaded_total"] == st["device_rows_loaded"] * ROW_BYTES


def test_host_kv_gb_sizes_sglangs_pool(tiny_offload):
    """SGLang admits requests by the host pool ``host_kv_gb`` gives it (below the launch's --max-total-tokens
    70000), and the pool it allocated is that size."""
    info = tiny_offload.get("/get_server_info")
    tokens = int(HOST_KV_GB * 2**30) // TOKEN_BYTES
    assert info["max_total_num_tokens"] == tokens
    st = tiny_offload.icecache_stats(wait_s=0)
    assert st["kv_pool_host"] == 1
    assert tokens * TOKEN_BYTES <= st["kv_pool_bytes"] <= (tokens + 64) * TOKEN_BYTES  # plus SGLang's padding


def test_prefill_attends_over_staged_rows_and_reuses_host_kv_on_a_prefix_hit(tiny_ref, tiny_offload):
    """With offload, prefill attends over the batch's rows staged from the host pool (``pool/staging.py``): a
    second turn that extends the first is a radix-cache hit whose prefix comes from host memory, and both
    turns answer token for token like IceCache without offload."""
    before = tiny_offload.icecache_stats(wait_s=0)
    first = token_ids(1400, 41)
    out1 = answer(tiny_offload, first, 12)
    assert out1 == answer(tiny_ref, first, 12)
    second = first + out1 + token_ids(300, 42)
    r = tiny_offload.generate(input_ids=second, max_new_tokens=12, ignore_eos=True)
    assert r["meta_info"]["cached_tokens"] >= len(first)  # the prefix was not recomputed
    assert r["output_ids"] == answer(tiny_ref, second, 12)
    st = tiny_offload.icecache_stats()
    # the second turn's prefill gathered its cached prefix at every layer
    assert st["prefill_rows_staged_total"] - before["prefill_rows_staged_total"] >= LAYERS * len(first)
    assert st["prefill_staging_bytes"] >= len(second) * KV_HEADS * ROW_BYTES  # one layer of the largest batch


def test_sessions_far_beyond_the_device_pool_all_complete_through_it(tiny_ref, tiny_offload):
    before = tiny_offload.icecache_stats(wait_s=0)
    info = tiny_offload.get("/get_server_info")
    assert info["max_running_requests"] == LANES  # SGLang runs as many requests as the device pool holds
    jobs = [token_ids(1200 + 50 * i, 100 + i) for i in range(8)]
    assert sum(map(len, jobs)) > 20 * LANES * LANE_ROWS  # the contexts add up to 20x the device pool
    got = answer_all(tiny_offload, jobs, 16)
    assert got == [answer(tiny_ref, ids, 16) for ids in jobs]
    st = tiny_offload.icecache_stats()
    assert st["device_kv_bytes"] == before["device_kv_bytes"]  # fixed at launch
    assert st["device_lanes_in_use"] == 0  # every lane went back when its request ended
    assert st["kv_pool_bytes"] == before["kv_pool_bytes"]
    assert st["fallbacks"] == before.get("fallbacks", 0)


def test_prefill_batches_stay_within_the_staging_buffer(tiny_ref, tiny_offload):
    """The prefill staging buffer is allocated at launch (one request of the context length) and SGLang's
    prefill admission keeps every extend batch within it: prompts that together stage more than it holds
    are prefilled in several batches (before, the buffer grew to the batch's sum of contexts), and each
    answers as without offload."""
    before = tiny_offload.icecache_stats(wait_s=0)
    rows = before["prefill_staging_bytes"] // (KV_HEADS * ROW_BYTES)
    assert CONTEXT <= rows < CONTEXT + 64, rows  # SGLang's req_to_token width: the context and a little slack
    jobs = [token_ids(2500, 400 + i) for i in range(LANES)]  # any two stage more rows than the buffer holds
    got = answer_all(tiny_offload, jobs, 8)
    assert got == [answer(tiny_ref, ids, 8) for ids in jobs]
    st = tiny_offload.icecache_stats()
    assert st["prefill_staging_bytes"] == before["prefill_staging_bytes"]  # never grown
    assert st["prefill_admission_deferrals_total"] > before["prefill_admission_deferrals_total"]


def test_flush_cache_and_aborts_return_every_lane(tiny_offload):
    jobs = [token_ids(900, 300 + i) for i in range(LANES)]
    threads = [threading.Thread(target=answer, args=(tiny_offload, ids, 40)) for ids in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    tiny_offload.post("/flush_cache", {})
    st = tiny_offload.icecache_stats()
    assert st["device_lanes_in_use"] == 0 and st["live_seqs"] == 0


def test_the_budget_cannot_outgrow_the_lanes(tiny_offload):
    with pytest.raises(ValueError, match="with offload the device pool's lanes hold 144"):
        tiny_offload.set_icecache(budget_tokens=512)
    with pytest.raises(ValueError, match="with offload the device pool's lanes hold 144"):
        tiny_offload.set_icecache(max_stale_steps=2)  # the launch budget fills the lane: no room for staleness
    tiny_offload.set_icecache(budget_tokens=96)  # a smaller one fits the lanes
    r = tiny_offload.generate(input_ids=token_ids(700, 7), max_new_tokens=8, ignore_eos=True)
    assert r["meta_info"]["completion_tokens"] == 8
    tiny_offload.set_icecache(budget_tokens=TINY_ICE["budget_tokens"])


def test_reused_selections_decode_through_the_lanes(tiny_ref, tiny_offload):
    """``step_reuse`` and ``max_stale_steps`` with offload: a lane holds a reused selection's pages and every
    token indexed since (one row per step of age, within the launch's lane when the budget is lowered).
    Synchronous reuse answers token for token like the same reuse without offload; asynchronous selection
    keeps its staleness bound and every request completes."""
    try:
        for srv in (tiny_ref, tiny_offload):
            srv.set_icecache(budget_tokens=96, step_reuse=3)  # lanes of 96 + 16 + 2 rows fit the launch's 144
        for n, seed in ((1500, 11), (3000, 12)):
            ids = token_ids(n, seed)
            assert answer(tiny_offload, ids, 32) == answer(tiny_ref, ids, 32), n
        st = tiny_offload.icecache_stats()
        assert st["reused_selections"] > 0 and st["selection_age_steps_max"] == 2
        tiny_offload.set_icecache(step_reuse=1, max_stale_steps=4)
        before = tiny_offload.icecache_stats(wait_s=0)
        jobs = [token_ids(1200 + 300 * i, 20 + i) for i in range(LANES)]
        got = answer_all(tiny_offload, jobs, 40)
        assert [len(g) for g in got] == [40] * len(jobs)
        st = tiny_offload.icecache_stats()
        assert st["reused_selections"] > before["reused_selections"]
        assert st["selection_age_steps_max"] <= 4 and st["device_lanes_in_use"] == 0
    finally:
        for srv in (tiny_ref, tiny_offload):
            srv.set_icecache(budget_tokens=TINY_ICE["budget_tokens"], step_reuse=1, max_stale_steps=0)


@pytest.fixture(scope="module")
def tiny_offload_retract():
    """An offload server whose scheduler retracts running requests every 3 decode steps (SGLang's own test
    switch, ``SGLANG_TEST_RETRACT``): their KV slots, rows and lanes are freed and they are re-run later."""
    from sglang_servers import LOG_DIR

    from icecache_sglang.launch import ServerProcess

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    srv = ServerProcess(ensure_tiny_model(), icecache_args(OFFLOAD), log_path=LOG_DIR / "tiny_offload_retract.log",
                        env={"SGLANG_TEST_RETRACT": "1"})
    srv.start()
    yield srv
    srv.stop()


def test_retracted_requests_complete_and_leave_nothing_behind(tiny_offload_retract):
    """Retraction (SGLang frees a running request's KV and re-runs it later) with offload: every request
    completes, and once they end and the cache is flushed, no lane, host slot, index or sequence is left."""
    srv = tiny_offload_retract
    jobs = [token_ids(900 + 200 * i, 60 + i) for i in range(LANES)]
    got = answer_all(srv, jobs, 40)
    assert [len(g or []) for g in got] == [40] * len(jobs)
    log = srv.tail(10**6)
    assert "retraction" in log.lower() and "#retracted_reqs: " in log  # SGLang did retract
    st = srv.icecache_stats()
    assert st["device_lanes_in_use"] == 0 and st["live_seqs"] == 0
    srv.post("/flush_cache", {})
    st = srv.icecache_stats()
    tr, ind = st["tracker"], st["indexer"]
    assert (tr["live"], tr["retained"], tr["slots_referenced"], st["ledger_sequences"]) == (0, 0, 0, 0), st
    assert (ind["sequences"], ind["tokens"], ind["index_bytes"]) == (0, 0, 0), ind
    assert st["device_lanes_in_use"] == 0
    info = srv.get("/get_server_info")
    assert info["max_total_num_tokens"] == int(HOST_KV_GB * 2**30) // TOKEN_BYTES
