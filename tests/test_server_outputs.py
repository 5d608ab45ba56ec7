"""Outputs of a real model (SmolLM2-135M-Instruct) through real SGLang servers on CPU: IceCache with a
budget that covers the context answers token for token like stock SGLang, and a second turn served from
the radix cache answers like a server without radix cache while indexing only its new tokens.

Why turn 2 is compared for closeness, not identity, once decoding is sparse: with the radix cache, turn 2
reuses turn 1's index (built from turn 1's prompt, then extended in page-size blocks while turn 1 decoded)
and inserts its new tokens; without it, one bulk build covers everything. Both index the same tokens, but
the trees differ (incremental inserts vs a bulk build, as in the paper), so a page ranked 12th in one can
be 13th in the other and greedy decoding may diverge after a while. Identity is checked where it must hold:
short conversations, decoded densely."""

from __future__ import annotations

import difflib

import pytest
from sglang_servers import SMOL_ICE, icecache_args, server_fixture

from icecache_sglang.models.fetch import ensure_model, essays_text
from icecache_sglang.runtime.config import IceCacheConfig

pytestmark = pytest.mark.slow

# a KV pool of four 8k contexts (the model's own), not the CPU default's 70k tokens: 1.5 GB of float32 KV
# instead of 3.2 GB, whose allocation took 8 s of each server's start
SMOL_POOL = ("--max-total-tokens", "32768")
smol_dense = server_fixture("smol_dense", ensure_model, list(SMOL_POOL))
# --enable-cache-report: SGLang then reports radix-cache hits as usage.prompt_tokens_details.cached_tokens
smol_ice = server_fixture("smol_ice", ensure_model, icecache_args(SMOL_ICE, "--enable-cache-report", *SMOL_POOL))
smol_ice_noradix = server_fixture("smol_ice_noradix", ensure_model,
                                  icecache_args(SMOL_ICE, "--disable-radix-cache", *SMOL_POOL))

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers.", "Explain what a hash table is in one sentence."]


def chat_ids(srv, messages, max_tokens):
    r = srv.post("/v1/chat/completions", {"model": "default", "messages": messages, "max_tokens": max_tokens,
                                          "temperature": 0})
    return r["choices"][0]["message"]["content"], r["usage"]


def test_budget_covering_the_context_is_token_identical_to_stock_sglang(smol_dense, smol_ice):
    for q in QUESTIONS:
        prompt = [{"role": "user", "content": q}]
        dense, u = chat_ids(smol_dense, prompt, 96)
        ice, _ = chat_ids(smol_ice, prompt, 96)
        assert u["prompt_tokens"] + u["completion_tokens"] <= SMOL_ICE["budget_tokens"]
        assert ice == dense, q


def test_passkey_far_beyond_the_budget_is_retrieved_by_sparse_decoding(smol_ice):
    """The accuracy harness's passkey task (benchmarks/accuracy/tasks.py: filler text, a 5-digit key, the raw
    prompt ending in "The pass key is"), its first three samples at 1024 tokens (keys at depths 0.1, 0.3,
    0.5), 4x the 256-token budget. The sink and the recent window hold only filler, so the answer carries
    the key only if the selected pages hold the needle: StreamingLLM's sink and window alone lose it, and
    IceCache at 256 found all 8 keys of this set in the quick preset (README, "Accuracy")."""
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from accuracy.tasks import make_samples

    tok = AutoTokenizer.from_pretrained(str(ensure_model()))
    # a selection late on a loaded CPU (an indexer's first query compiles its search) falls back to the most
    # recent pages: a matter of time, not of what is selected. A deadline far beyond any step makes every
    # selection the index's own answer, so a fallback below is a real failure to answer.
    smol_ice.set_icecache(selection_deadline_ms=30_000)
    try:
        for s in make_samples("passkey", tok, 1024, 3):
            (key,) = s.answers
            assert len(s.input_ids) >= 4 * SMOL_ICE["budget_tokens"]
            before = smol_ice.icecache_stats(wait_s=0)
            r = smol_ice.generate(input_ids=s.input_ids, max_new_tokens=s.max_new_tokens)
            after = smol_ice.icecache_stats()
            answer, meta = r["text"], r["meta_info"]
            assert meta["prompt_tokens"] == len(s.input_ids)
            assert key in answer, (s.sample_id, key, answer)
            # every decode step after the first token (the prefill's) was sparse, and the indexer answered each
            assert after["sparse_rows"] - before["sparse_rows"] >= meta["completion_tokens"] - 1 >= 4
            assert after["fallbacks"] == before["fallbacks"], {k: after.get(k) for k in after if "fall" in k
                                                               or "restart" in k or "timed_out" in k}
    finally:
        smol_ice.set_icecache(selection_deadline_ms=IceCacheConfig.selection_deadline_ms)


def test_short_second_turn_from_the_radix_cache_is_identical(smol_ice, smol_ice_noradix):
    turn1 = [{"role": "user", "content": QUESTIONS[3]}]
    a1, u1 = chat_ids(smol_ice, turn1, 48)
    turn2 = [*turn1, {"role": "assistant", "content": a1}, {"role": "user", "content": "Give an example."}]
    a2, u2 = chat_ids(smol_ice, turn2, 48)
    b2, _ = chat_ids(smol_ice_noradix, turn2, 48)
    # turn 2 starts with turn 1's prompt (same chat template): its prefill is a radix hit over at least that
    details = u2["prompt_tokens_details"]
    assert details is not None, "no cache report: smol_ice must run with --enable-cache-report"
    cached = details["cached_tokens"]
    assert u1["prompt_tokens"] - 2 <= cached < u2["prompt_tokens"], (cached, u1, u2)
    assert a2 == b2


def test_second_turn_reuses_the_prefix_index_and_answers_like_no_radix(smol_ice, smol_ice_noradix):
    text = essays_text()[6000:10000]
    turn1 = [{"role": "user", "content": text + "\n\nSummarise the text above in one sentence."}]
    a1, u1 = chat_ids(smol_ice, turn1, 40)
    b1, _ = chat_ids(smol_ice_noradix, turn1, 40)
    assert a1 == b1
    before = smol_ice.icecache_stats()
    turn2 = [*turn1, {"role": "assistant", "content": a1}, {"role": "user", "content": "Now name its main topic."}]
    r = smol_ice.post("/v1/chat/completions", {"model": "default", "messages": turn2, "max_tokens": 24,
                                               "temperature": 0})
    a2, u2 = r["choices"][0]["message"]["content"], r["usage"]
    after = smol_ice.icecache_stats()
    b2, _ = chat_ids(smol_ice_noradix, turn2, 24)
    assert after["fallbacks"] == before["fallbacks"]
    similarity = difflib.SequenceMatcher(None, a2.split(), b2.split()).ratio()
    assert similarity >= 0.6, (a2, b2)  # a stale or wrong shared index gives unrelated text
    new_tokens = u2["prompt_tokens"] - u1["prompt_tokens"] + u2["completion_tokens"]
    assert after["shared_tokens"] - before["shared_tokens"] >= u1["prompt_tokens"] - 2 * SMOL_ICE["window_tokens"]
    assert after["indexed_tokens"] - before["indexed_tokens"] <= new_tokens + SMOL_ICE["page_size"]
