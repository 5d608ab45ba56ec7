"""--enable-icecache through a real SGLang server on CPU, with a tiny random Llama (mechanics, not quality):
the HTTP and OpenAI APIs, the frontend language, bounded attended KV up to 16k tokens, prefix reuse, stats
and settings on a running server. Faults (indexer killed or stopped, disconnects, hostile input) are in
test_server_faults.py."""

from __future__ import annotations

import json
import random

import pytest
from sglang_servers import TINY_ICE, icecache_args, server_fixture

from icecache_sglang.models.tiny import ensure_tiny_model

pytestmark = pytest.mark.slow

#: a forward pass of half a second is reported with the scheduler's stack (a 16k-token prefill takes longer)
STALL_S = 0.5
tiny_ice = server_fixture("tiny_ice", ensure_tiny_model,
                          icecache_args({**TINY_ICE, "stall_report_s": STALL_S}, "--enable-metrics"))

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


def test_attended_kv_stays_bounded_up_to_16k_tokens(tiny_ice):
    """The KV attended per request (all layers, computed from the decode plans) stays within the budget while
    the context grows 16x; the allocated figures are the real sizes of SGLang's pool (which holds the indexed keys) and the indexes."""
    C = TINY_ICE["page_size"]
    bound = LAYERS * (TINY_ICE["budget_tokens"] + C - 1) * TOKEN_BYTES  # the window may run a block ahead
    seen = []
    for n in (1000, 4000, 16000):
        r = tiny_ice.generate(input_ids=token_ids(n, n), max_new_tokens=6)
        ctx = r["meta_info"]["prompt_tokens"]
        st = tiny_ice.icecache_stats()
        seen.append((ctx, st["attended_kv_bytes_last"]))
        assert 0 < st["attended_kv_bytes_last"] <= bound, seen
    assert seen[-1][0] == 16000, seen
    dense_bytes = LAYERS * seen[-1][0] * TOKEN_BYTES
    assert seen[-1][1] < dense_bytes / 50, seen
    slots = tiny_ice.get("/get_server_info")["max_total_num_tokens"] + 1  # SGLang's pool: one padding slot
    assert st["kv_pool_bytes"] == slots * LAYERS * TOKEN_BYTES
    # the anchor layers' K planes of that pool are the indexer's key store: no second copy of the keys
    assert st["keys_shared"] == 1 and st["key_store_bytes"] == 0
    assert st["index_bytes"] > 0 and st["icecache_host_bytes"] == st["index_bytes"]


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
    assert "sglang:icecache_attended_kv_bytes_last" in text and "sglang:icecache_fallbacks" in text
    assert 'sglang:icecache_indexer_up{tp_rank="0"} 1.0' in text
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


def test_a_slow_forward_pass_is_logged_with_the_schedulers_stack(tiny_ice):
    """The stall report (patches/scheduler.py, runtime/stall.py) inside a real scheduler: a 16k-token prefill
    pass outlasts stall_report_s and the log shows where the scheduler thread was, down to the model."""
    tiny_ice.generate(input_ids=token_ids(16000, 99), max_new_tokens=2)
    log = tiny_ice.log_path.read_text(errors="replace")
    i = log.find("IceCache: the scheduler has been on one forward pass")
    assert i >= 0, tiny_ice.tail(60)
    report = log[i: i + 20000]
    assert "event_loop" in report and "forward" in report, report[:4000]


def test_a_chunked_prefill_is_indexed_once_after_its_last_chunk(tiny_ice):
    """A prompt SGLang prefills in three chunks (8192 tokens each on CPU) reaches the indexer as one Build
    per anchor layer and no Insert: indexed chunk by chunk it cost 3.7x (32k) to 6.8x (64k) the indexer
    time (benchmarks/prefill_indexing.py)."""
    a = tiny_ice.icecache_stats()["indexer"]
    r = tiny_ice.generate(input_ids=token_ids(20000, 7), max_new_tokens=4)
    assert r["meta_info"]["completion_tokens"] == 4
    b = tiny_ice.icecache_stats()["indexer"]
    assert b["builds"] - a["builds"] == LAYERS, (a, b)
    assert b["inserts"] - a["inserts"] == 0, (a, b)
    # the Build goes out right after the last chunk (patches/forward_batch.py), before any decode step: a
    # prompt-only request is indexed too (a later request can share its prefix)
    tiny_ice.generate(input_ids=token_ids(9000, 8), max_new_tokens=1)
    c = tiny_ice.icecache_stats()["indexer"]
    assert c["builds"] - b["builds"] == LAYERS and c["inserts"] == b["inserts"], (b, c)


def test_lowrank_selection_serves_a_long_prompt_through_its_first_pass(tiny_ice):
    """``selection: lowrank`` through the server: a 20000-token prompt (past the 16384-token threshold) is
    scanned exactly for each layer's first queries, then selected through the low-rank codes fitted from
    them (``index/lowrank.py``), with no fallback; the indexer's stats count both."""
    from test_lowrank import lowrank_queries

    tiny_ice.set_icecache(selection="lowrank")
    try:
        a = tiny_ice.icecache_stats()
        # the prompt of the chunked-prefill test above: its prefix is in the radix cache (no 20k prefill again)
        r = tiny_ice.generate(input_ids=token_ids(20000, 7), max_new_tokens=16, ignore_eos=True)
        assert r["meta_info"]["completion_tokens"] == 16
        b = tiny_ice.icecache_stats()
        steps = b["decode_steps"] - a["decode_steps"]
        assert b["fallbacks"] == a["fallbacks"], (a, b)
        ia, ib = a["indexer"], b["indexer"]
        # each anchor layer fits its codes after FIT_AFTER queries (layers staggered), then uses them
        want = sum(lowrank_queries(steps, 20000, layer) for layer in range(LAYERS))
        assert ib["lowrank_rows"] - ia["lowrank_rows"] == want > 0, (steps, ia, ib)
        assert ib["lowrank_indexes"] >= LAYERS and ib["lowrank_bytes"] > 0
        # ``lowrank_pages`` on the same prompt: the radix hit shares the prefix's index, fitted codes included
        # (a copy without the answer's tokens: the pages that changed are coded again), so every anchor layer's
        # queries go through the page stage and the first pass, with no fallback
        tiny_ice.set_icecache(selection="lowrank_pages")
        r = tiny_ice.generate(input_ids=token_ids(20000, 7), max_new_tokens=16, ignore_eos=True)
        assert r["meta_info"]["completion_tokens"] == 16
        c = tiny_ice.icecache_stats()
        steps = c["decode_steps"] - b["decode_steps"]
        assert c["fallbacks"] == b["fallbacks"], (b, c)
        assert c["indexer"]["lowrank_rows"] - ib["lowrank_rows"] >= (steps - 1) * LAYERS > 0, (steps, ib, c["indexer"])
    finally:
        tiny_ice.set_icecache(selection="exact")
