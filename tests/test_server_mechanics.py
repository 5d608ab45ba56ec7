"""--enable-icecache through a real SGLang server on CPU, with a tiny random Llama (mechanics, not quality):
the HTTP and OpenAI APIs, the frontend language, bounded device KV up to 16k tokens, prefix reuse and
cleanup under 200 concurrent requests with aborts, and an indexer killed mid-decode."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time

import pytest
from sglang_servers import TINY_ICE, icecache_args, server_fixture

from icecache_sglang.models.tiny import ensure_tiny_model

pytestmark = pytest.mark.slow

tiny_ice = server_fixture("tiny_ice", ensure_tiny_model, icecache_args(TINY_ICE, "--enable-metrics"))

TOKEN_BYTES = 2 * (32 + 32) * 4  # tiny model: 2 KV heads, head_dim 32, K and V, float32
LAYERS = 4


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_generate_runs_sparse_decode(tiny_ice):
    before = tiny_ice.icecache_stats(wait_s=0)
    r = tiny_ice.generate(words(400), max_new_tokens=12)
    assert r["meta_info"]["completion_tokens"] == 12
    assert r["meta_info"]["prompt_tokens"] > TINY_ICE["budget_tokens"]
    st = tiny_ice.icecache_stats()
    assert st["sparse_rows"] - before.get("sparse_rows", 0) >= 11  # every decode step of this request
    assert st["queries"] > before.get("queries", 0)
    assert st["fallbacks"] == 0
    # a short request stays dense and indexes nothing
    n0 = st["indexed_tokens"]
    r = tiny_ice.generate("Hello there", max_new_tokens=8)
    assert r["meta_info"]["completion_tokens"] == 8
    assert tiny_ice.icecache_stats()["indexed_tokens"] == n0


def test_openai_chat_and_streaming(tiny_ice):
    import openai

    client = openai.OpenAI(base_url=tiny_ice.url + "/v1", api_key="none")
    msgs = [{"role": "user", "content": words(300)}]
    full = client.chat.completions.create(model="default", messages=msgs, max_tokens=10, temperature=0)
    assert full.usage.completion_tokens == 10
    chunks = client.chat.completions.create(model="default", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content


def test_frontend_language_multi_turn(tiny_ice):
    import sglang as sgl

    @sgl.function
    def chat(s, first, second):
        s += sgl.user(first)
        s += sgl.assistant(sgl.gen("a1", max_tokens=8, temperature=0))
        s += sgl.user(second)
        s += sgl.assistant(sgl.gen("a2", max_tokens=8, temperature=0))

    backend = sgl.RuntimeEndpoint(tiny_ice.url)
    state = chat.run(first=words(300), second=words(20, 5000), backend=backend)
    assert state["a1"] and state["a2"]
    states = chat.run_batch([{"first": words(200, 100 * i), "second": "next"} for i in range(3)], backend=backend)
    assert all(s["a2"] is not None for s in states)


def token_ids(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(100, 40000), k=n)


def test_device_kv_stays_bounded_up_to_16k_tokens(tiny_ice):
    """The KV attended per request (all layers) stays within the budget while the context grows 16x."""
    C = TINY_ICE["page_size"]
    bound = LAYERS * (TINY_ICE["budget_tokens"] + C - 1) * TOKEN_BYTES  # the window may run a block ahead
    seen = []
    for n in (1000, 4000, 16000):
        r = tiny_ice.generate(input_ids=token_ids(n, n), max_new_tokens=6)
        ctx = r["meta_info"]["prompt_tokens"]
        st = tiny_ice.icecache_stats()
        seen.append((ctx, st["device_kv_bytes_last"]))
        assert 0 < st["device_kv_bytes_last"] <= bound, seen
    assert seen[-1][0] == 16000, seen
    dense_bytes = LAYERS * seen[-1][0] * TOKEN_BYTES
    assert seen[-1][1] < dense_bytes / 50, seen
    assert st["host_kv_bytes"] >= dense_bytes


def test_prefix_hit_indexes_only_new_tokens(tiny_ice):
    turn1 = words(600, 20000)
    r1 = tiny_ice.generate(turn1, max_new_tokens=16)
    a = tiny_ice.icecache_stats()
    turn2 = turn1 + r1["text"] + words(30, 30000)
    r2 = tiny_ice.generate(turn2, max_new_tokens=16)
    b = tiny_ice.icecache_stats()
    assert r2["meta_info"]["cached_tokens"] > r1["meta_info"]["prompt_tokens"] - 16
    new_tokens = r2["meta_info"]["prompt_tokens"] - r1["meta_info"]["prompt_tokens"] + 16
    assert b["shared_tokens"] - a["shared_tokens"] >= r1["meta_info"]["prompt_tokens"] - 64
    assert b["indexed_tokens"] - a["indexed_tokens"] <= new_tokens + 16
    # the indexer itself received only those tokens (for each of the 4 indexed layers)
    assert b["indexer"]["indexed_tokens"] - a["indexer"]["indexed_tokens"] <= LAYERS * (new_tokens + 16)


async def _one_request(url: str, prompt: str, max_new: int, abort_after: int | None):
    import aiohttp

    payload = {"text": prompt, "stream": True, "sampling_params": {"max_new_tokens": max_new, "temperature": 0}}
    async with aiohttp.ClientSession() as s, s.post(url + "/generate", json=payload) as resp:
        chunks = 0
        async for line in resp.content:
            if not line.strip().startswith(b"data:"):
                continue
            if line.strip() == b"data: [DONE]":
                return "done"
            chunks += 1
            if abort_after is not None and chunks >= abort_after:
                return "aborted"  # leaving the session closes the connection: SGLang aborts the request
        return "done"


def test_200_concurrent_requests_with_aborts_leave_nothing_behind(tiny_ice):
    rng = random.Random(7)
    jobs = []
    for i in range(200):
        n = rng.randint(20, 180)
        prompt = words(n, rng.choice([0, 50000, 60000]) + (i % 3) * 7)  # some shared prefixes
        abort = rng.randint(1, 6) if rng.random() < 0.25 else None
        jobs.append((prompt, rng.randint(4, 24), abort))

    async def run_all():
        return await asyncio.gather(*(_one_request(tiny_ice.url, *j) for j in jobs), return_exceptions=True)

    results = asyncio.run(run_all())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert results.count("done") >= 140
    time.sleep(2.0)  # aborted requests finish leaving the scheduler
    st = tiny_ice.icecache_stats(wait_s=1.5)
    assert st["tracker"]["live"] == 0
    assert st["indexer"]["sequences"] == st["tracker"]["retained"]  # only cached prefixes keep an index
    assert st["indexer"]["errors"] == 0
    tiny_ice.post("/flush_cache", {})
    st = tiny_ice.icecache_stats(wait_s=1.5)
    assert st["tracker"] == {"live": 0, "retained": 0, "retained_tokens": 0, "slots_referenced": 0}
    ind = st["indexer"]
    assert (ind["sequences"], ind["layer_entries"], ind["indexes"], ind["tokens"], ind["index_bytes"],
            ind["state_slots"]) == (0, 0, 0, 0, 0, 0)
    mine = [d for d in os.listdir("/dev/shm") if d.startswith("icecache-")]
    assert len(mine) <= 1  # this server's private directory (key store + socket), nothing else of ours


def test_indexer_killed_mid_decode_is_survived_and_restarted(tiny_ice):
    st = tiny_ice.icecache_stats(wait_s=0)
    pid, restarts = st["indexer_pid"], st["indexer_restarts"]
    out = {}

    def long_request():
        out["r"] = tiny_ice.generate(words(500, 70000), max_new_tokens=160)

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the request decodes sparsely
        cur = tiny_ice.icecache_stats(wait_s=0.3)
        if cur.get("live_seqs", 0) >= 1 and cur["decode_steps"] > st["decode_steps"] + 5:
            break
    os.kill(pid, signal.SIGKILL)
    t.join(300)
    assert not t.is_alive()
    assert out["r"]["meta_info"]["completion_tokens"] == 160
    after = tiny_ice.icecache_stats()
    assert after["indexer_restarts"] == restarts + 1
    assert after["indexer_pid"] != pid
    r = tiny_ice.generate(words(400, 80000), max_new_tokens=8)  # the new indexer serves
    assert r["meta_info"]["completion_tokens"] == 8
    assert tiny_ice.icecache_stats()["fallbacks"] == after["fallbacks"]
    log = tiny_ice.log_path.read_text(errors="replace")
    assert "IceCache indexer (rank 0) is dead: restarting" in log


def test_stats_endpoint_metrics_and_log_line(tiny_ice):
    r = tiny_ice.generate(input_ids=token_ids(600, 3), max_new_tokens=45)  # > 40 sparse steps: one log line
    assert r["meta_info"]["completion_tokens"] == 45
    tiny_ice.icecache_stats()
    data = tiny_ice.get("/icecache/stats")
    assert data["enabled"] is True
    json.dumps(data)
    st = data["ranks"]["0"]
    text = tiny_ice.get("/metrics")["text"]
    assert 'sglang:icecache_sparse_rows{tp_rank="0"}' in text
    assert "sglang:icecache_device_kv_bytes_last" in text and "sglang:icecache_fallbacks" in text
    line = next(ln for ln in text.splitlines() if ln.startswith('sglang:icecache_sparse_rows{'))
    assert float(line.split()[-1]) > 0 and st["sparse_rows"] > 0
    assert "IceCache: sparse-req" in tiny_ice.log_path.read_text(errors="replace")


def test_settings_change_on_the_running_server(tiny_ice):
    """POST /icecache/config: the next request decodes with the new budget and a baseline selection served by
    the same indexer; settings fixed at launch and bad values are refused with the reason."""
    try:
        r = tiny_ice.set_icecache(selection="streaming", budget_tokens=192, selection_deadline_ms=2000)
        assert r["config"]["selection"] == "streaming" and r["config"]["budget_tokens"] == 192
        before = tiny_ice.icecache_stats(wait_s=0)
        out = tiny_ice.generate(input_ids=token_ids(500, 11), max_new_tokens=10)
        assert out["meta_info"]["completion_tokens"] == 10
        st = tiny_ice.icecache_stats()
        assert (st["selection"], st["budget_tokens"], st["config_version"]) == ("streaming", 192, r["version"])
        assert st["deadline_s"] == 2.0
        assert st["queries"] > before["queries"] and st["fallbacks"] == before["fallbacks"]
        # a request between the old and the new budget is dense now
        n0 = st["indexed_tokens"]
        tiny_ice.generate(input_ids=token_ids(170, 12), max_new_tokens=4)
        assert tiny_ice.icecache_stats()["indexed_tokens"] == n0
        with pytest.raises(ValueError, match="cannot change on a running server"):
            tiny_ice.set_icecache(page_size=32)
        with pytest.raises(ValueError, match="selection must be one of"):
            tiny_ice.set_icecache(selection="h2o")
        with pytest.raises(ValueError, match="budget_tokens"):
            tiny_ice.set_icecache(budget_tokens=40)
    finally:
        tiny_ice.set_icecache(selection="icecache", budget_tokens=TINY_ICE["budget_tokens"], selection_deadline_ms=500)
