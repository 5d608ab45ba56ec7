"""The benchmarks measure what they claim: brute force returns the index's exhaustive answer, and the
quality evaluation's numbers are consistent (oracle token >= every method)."""

import sys
from pathlib import Path

import numpy as np
from conftest import EXHAUSTIVE

from icecache_sglang.index.config import IndexConfig, QueryParams
from icecache_sglang.index.paged_index import PagedDCIIndex

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import index_quality  # noqa: E402
import index_speed  # noqa: E402


def test_bruteforce_equals_exhaustive_search(rng):
    K = rng.standard_normal((2, 3000, 16)).astype(np.float32)  # continuous: no tied page scores
    idx = PagedDCIIndex(2, 16, config=IndexConfig(page_size=16, rebuild_growth=None))
    idx.build(K)
    idx.insert(rng.standard_normal((2, 40, 16)).astype(np.float32))  # partly filled pages
    idx.delete(np.arange(0, 3000, 7))  # and a free list
    Q = rng.standard_normal((8, 16)).astype(np.float32)
    want = idx.query(Q, 12, QueryParams(**EXHAUSTIVE))  # rank-major merge
    assert np.array_equal(index_speed.scan_index(idx, Q, 12, "rank"), want)
    # with the mass merge the scan sees every page's score, the search each query head's best 12: the two
    # merges differ, but keep every query head's best page
    mass = index_speed.scan_index(idx, Q, 12)
    for h in range(2):
        assert set(want[h][:1]) <= set(mass[h])


def test_quality_evaluation_is_consistent(rng):
    from icecache_sglang.index.synthetic import clustered_keys

    K, Q = clustered_keys(rng, 3000, 16, n_clusters=16, n_queries=3, heads=2, group=2)
    V = rng.standard_normal(K.shape).astype(np.float32)
    out = index_quality.evaluate_layer(K, V, Q, [64, 256], 16)
    assert set(out) == {(m, b) for m in index_quality.METHODS for b in (64, 256)}
    for b in (64, 256):
        assert all(out[(m, b)][0] <= out[("oracle_token", b)][0] + 1e-9 for m in index_quality.METHODS)
        assert out[("icecache", b)][0] <= out[("oracle_page", b)][0] + 0.05
    assert all(out[(m, 256)][0] >= out[(m, 64)][0] - 1e-9 for m in index_quality.METHODS)
    table = index_quality.markdown_tables(
        [{"layer": "mean", "source": "s", "text": "", "context": 3000, "method": m, "budget": b,
          "mass_recall": v[0], "recall_at_k": v[1], "output_rel_err": v[2]} for (m, b), v in out.items()])
    assert "| icecache |" in table


def test_indexer_latency_measures_the_same_answers_both_ways():
    """The latency benchmark's two sides return identical selections (it asserts so) and its records
    carry the fields the README reads."""
    import indexer_latency

    from icecache_sglang.indexer import Indexer, KeyStore
    from icecache_sglang.indexer.service import IndexerService

    ix = Indexer.launch(num_layers=1, num_kv_heads=2, head_dim=indexer_latency.D,
                        num_slots=2 * 600, index=IndexConfig(page_size=indexer_latency.C), timeout_s=60)
    store = KeyStore.attach(ix.store.spec)
    try:
        local = IndexerService(ix.config, store)
        recs = indexer_latency.run_context(ix, local, 600, 2, [1, 3], reps=2, depth=2, rng=np.random.default_rng(0))
        del local
    finally:
        store.close()
        ix.close()
    assert [r["batch"] for r in recs] == [1, 3]
    for r in recs:
        assert r["in_process_us"] > 0 and r["ipc_us"] > 0 and r["queries_per_s"] > 0
        assert {"batch", "context", "in_process_us", "ipc_us", "queries_per_s"} <= set(r)
        assert r["kv_heads"] == 2 and r["q_heads"] == 8


def test_int8_keys_benchmark_records_bytes_and_times():
    """``int8_keys.py``'s speed part: both copies built over the same keys, the int8 index smaller than the
    bfloat16 one by about its key bytes, every timed op recorded."""
    import int8_keys

    recs = int8_keys.speed(3000, 4)
    by = {r["key_dtype"]: r for r in recs if r["part"] == "bytes"}
    assert by["int8"]["index_bytes_per_token_layer"] < by["bfloat16"]["index_bytes_per_token_layer"] - 800
    assert by["int8"]["page_copy_bytes_per_token_layer"] < 0.6 * by["bfloat16"]["page_copy_bytes_per_token_layer"]
    ops = {r["op"] for r in recs if r["part"] == "speed"}
    assert len(ops) == 5
    assert all(r["median_ms"] > 0 for r in recs if r["part"] == "speed")


def test_exact_batch_compares_the_same_answers_and_restores_the_service():
    """``exact_batch.py`` times each arm over the same query messages, checks every arm's pages and slots equal
    the one-sequence-at-a-time path's, and leaves the service's module settings as it found them."""
    import exact_batch

    from icecache_sglang.indexer import service

    before = (service.BATCHED_SCANS, service.SERIAL_BATCH_SEQUENCES, service.LONGEST_BATCHED_ELEMENTS,
              service.BATCHED_LONG_SEQUENCES)
    recs = exact_batch.measure("SmolLM2-135M", 300, [1, 4], reps=2, rng=np.random.default_rng(0))
    assert [r["batch"] for r in recs] == [1, 4] and all(r["same_answers"] for r in recs)
    assert all(r[f"{m}_us"] > 0 for r in recs for m in ("batched", "batched_one_thread", "batched_all_threads",
                                                         "one_at_a_time"))
    assert (service.BATCHED_SCANS, service.SERIAL_BATCH_SEQUENCES, service.LONGEST_BATCHED_ELEMENTS,
            service.BATCHED_LONG_SEQUENCES) == before


def test_the_gpu_serving_harness_runs_a_reranking_mode_on_cpu(tmp_path, monkeypatch):
    """``serve_gpu.py --cpu-dry-run`` (the harness on SGLang's CPU engine with the tiny model) measures a mode
    with ``token_rerank``: its outputs check at a budget covering the prompt must not ask the indexer for more
    pages than it selects (the server refused that setting and the mode never measured anything on the GPU)."""
    import json

    monkeypatch.setattr(sys, "path", list(sys.path))  # serve_gpu puts the repository root on it: undone after
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"))
    import serve_gpu

    assert serve_gpu.main(["--cpu-dry-run", "--out", str(tmp_path), "--modes", "icecache-async-rerank2",
                           "--contexts", "600", "--batches", "1", "--budgets", "256", "--output-tokens", "24",
                           "--min-point-s", "1"]) == 0
    recs = json.loads((tmp_path / "serve_gpu.json").read_text())
    assert not [r for r in recs if r["phase"] == "error"], [r.get("error") for r in recs]
    assert [r["budget"] for r in recs if r["phase"] == "check"] == [serve_gpu.COVERING_BUDGET, 256]
    serve = [r for r in recs if r["phase"] == "serve"]
    assert len(serve) == 1 and serve[0]["tpot_s"] > 0 and serve[0]["reranked_selections"] > 0
