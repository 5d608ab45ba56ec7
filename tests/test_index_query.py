"""Build and query: equality with the NumPy reference, T4 exactness, T5 monotonicity, T10
determinism, T12 GQA merge, T14 batched == per-head, and argument errors."""

import numpy as np
import pytest
from conftest import EXHAUSTIVE, int_keys, oracle_pages

from icecache_sglang.index.config import IndexConfig, QueryParams
from icecache_sglang.index.metrics import attention_probs, mass_recall
from icecache_sglang.index.paged_index import PagedDCIIndex
from icecache_sglang.index.reference import ReferenceIndex
from icecache_sglang.index.search import merge_group_pages
from icecache_sglang.index.selection import IceCachePolicy
from icecache_sglang.index.synthetic import clustered_keys


def _built(K, C=8, p0=0.02, **kw):
    idx = PagedDCIIndex(K.shape[0], K.shape[2], config=IndexConfig(page_size=C, p0=p0, **kw))
    idx.build(K)
    return idx


@pytest.mark.parametrize("layout,segment", [("projection", None), ("bisect", None), ("bisect", 1000)])
@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("fov,prop", [(3, 0.3), (12, 0.8), (10**9, 1.0)])
def test_fast_path_equals_reference(rng, fov, prop, faithful, layout, segment):
    H, n, d, C = 2, 4000, 12, 8
    K = int_keys(rng, (H, n, d))
    idx = _built(K, C, faithful_proj_scale=faithful, layout=layout, parent_segment=segment)
    Q = int_keys(rng, (5, d))
    for h in range(H):
        ref = ReferenceIndex(K[h], C, idx.cfg.level0_prob, idx.cfg.p_up, idx.cfg.seed, faithful_proj_scale=faithful,
                             layout=layout, parent_segment=segment)
        assert np.array_equal(ref.level, idx.tok_level[h, :n])
        assert np.array_equal(ref.parent, idx.tok_parent[h, :n])
        for p, toks in enumerate(ref.pages):  # same page ids, same tokens in the same slots
            assert idx.page_tok[h, p, : idx.page_fill[h, p]].tolist() == toks
        pages, scores = idx.query_rows(Q, np.full(5, h), 10, QueryParams(fov=fov, prop_to_retrieve=prop))
        for r in range(5):
            rp, rs = ref.query(Q[r], 10, fov, prop)
            assert pages[r, : len(rp)].tolist() == rp
            assert np.all(pages[r, len(rp):] == -1)
            assert np.array_equal(scores[r, : len(rp)], np.asarray(rs, np.float32))


def test_heads_searching_their_parents_side_by_side_equal_the_reference(rng, monkeypatch):
    """A large build or Insert searches each head's parents on its own thread (NumPy and BLAS); every head's
    levels, parents and pages are still the reference's, and an Insert's state is the one-head-at-a-time one."""
    import threading

    import numba

    from icecache_sglang.index import paged_index

    if numba.get_num_threads() < 2:
        pytest.skip("one numba thread: the heads' parents are searched in turn")
    monkeypatch.setattr(paged_index, "PARALLEL_PARENTS_MIN", 0)  # this small build too
    threads = set()

    def seen(search):
        def spy(*a, **kw):
            threads.add(threading.current_thread().name.split("_")[0])
            return search(*a, **kw)
        return spy

    monkeypatch.setattr(paged_index, "segmented_parents", seen(paged_index.segmented_parents))  # a build's
    monkeypatch.setattr(paged_index, "exact_parents", seen(paged_index.exact_parents))  # an Insert's
    H, n, d = 4, 3000, 12
    K = int_keys(rng, (H, n, d))
    idx = _built(K, 8, layout="bisect", parent_segment=1000)
    assert threads == {"icecache-parents"}
    for h in range(H):
        ref = ReferenceIndex(K[h], 8, idx.cfg.level0_prob, idx.cfg.p_up, idx.cfg.seed, layout="bisect",
                             parent_segment=1000)
        assert np.array_equal(ref.parent, idx.tok_parent[h, :n])
        for p, toks in enumerate(ref.pages):
            assert idx.page_tok[h, p, : idx.page_fill[h, p]].tolist() == toks
    # an Insert's parents too: the same state as one index built and inserted into a head at a time
    new = int_keys(rng, (H, 500, d))
    threads.clear()
    idx.insert(new)
    assert threads == {"icecache-parents"}
    monkeypatch.setattr(paged_index, "PARALLEL_PARENTS_MIN", float("inf"))
    threads.clear()
    one_by_one = _built(K, 8, layout="bisect", parent_segment=1000)
    one_by_one.insert(new)
    assert threads == {threading.current_thread().name.split("_")[0]}  # the test's own thread only
    for a, b in zip(idx.state, one_by_one.state):
        assert np.array_equal(a, b)


def test_t4_exhaustive_search_equals_oracle_pages(rng):
    H, n, d = 3, 6000, 16
    K = int_keys(rng, (H, n, d))
    idx = _built(K, 16, p0=0.01)
    assert idx.top_level().min() >= 2
    Q = int_keys(rng, (H * 4, d))
    for P in (1, 12, 60):
        pages, _ = idx.query_rows(Q, np.repeat(np.arange(H), 4), P, QueryParams(**EXHAUSTIVE))
        for r in range(Q.shape[0]):
            assert pages[r].tolist() == oracle_pages(idx, r // 4, Q[r], P)


def test_parent_segment_keeps_level0_parents_in_their_run(rng):
    """Runs of about ``parent_segment`` tokens: each level-0 token's parent is the exact nearest level-1 token of
    its own run (a run without one: of all), upper levels search every token of the level above."""
    H, n, d = 1, 5000, 12
    K = int_keys(rng, (H, n, d))
    whole, runs = _built(K, 8, p0=0.02), _built(K, 8, p0=0.02, parent_segment=1000)
    bounds = np.arange(6) * 1000
    lv, par = runs.tok_level[0, :n], runs.tok_parent[0, :n]
    kids = np.flatnonzero(lv == 0)
    assert np.array_equal(np.searchsorted(bounds, kids, "right"), np.searchsorted(bounds, par[kids], "right"))
    assert not np.array_equal(whole.tok_parent[0, :n], par)  # fails if the runs are ignored
    up = np.flatnonzero(lv == 1)
    assert np.array_equal(whole.tok_parent[0, up], par[up])
    with pytest.raises(ValueError, match="parent_segment"):
        IndexConfig(parent_segment=100)
    runs.check_invariants()  # the exact-parent invariant holds within runs (it failed for built runs before)
    runs.insert(int_keys(rng, (H, 40, d)))  # inserted tokens take the nearest of all level-1 tokens
    runs.delete(runs.live_ids()[[3, 1500, 4100]])
    runs.check_invariants()
    assert runs.copy().run_starts.tolist() == runs.run_starts.tolist() == [1000, 2000, 3000, 4000]


def test_t4_exhaustive_token_mode_equals_brute_force(rng):
    K = rng.standard_normal((3000, 16)).astype(np.float32)
    ref = ReferenceIndex(K, 8, 0.02, 0.2, 0)
    for _ in range(5):
        q = rng.standard_normal(16).astype(np.float32)
        s = K.astype(np.float64) @ q.astype(np.float64)
        assert ref.query_tokens(q, 25, fov=10**9, prop=1.0) == np.argsort(-s, kind="stable")[:25].tolist()


def test_t5_recall_grows_with_fov_and_prop(rng):
    K, Q = clustered_keys(rng, n=8000, d=32, n_clusters=64, n_queries=50, heads=1)
    Q = Q[:, 0]
    idx = _built(K, 16, p0=0.01)
    probs = attention_probs(Q, K)
    masses = []
    for fov, prop in [(2, 0.2), (6, 0.5), (30, 0.8), (10**9, 1.0)]:
        per_q = []
        for r in range(Q.shape[0]):
            pages = idx.query(Q[r : r + 1], 6, QueryParams(fov=fov, prop_to_retrieve=prop))
            per_q.append(mass_recall(probs[r : r + 1], [idx.pages_to_positions(0, pages[0][pages[0] >= 0])]))
        masses.append(np.mean(per_q))
    assert all(b >= a - 0.005 for a, b in zip(masses, masses[1:])), masses
    assert masses[-1] > masses[0] + 0.05, masses


def test_t10_deterministic_across_instances(rng):
    K = rng.standard_normal((2, 5000, 16)).astype(np.float32)
    V = rng.standard_normal((2, 5000, 4)).astype(np.float32)
    Q = rng.standard_normal((8, 16)).astype(np.float32)
    a, b = (PagedDCIIndex(2, 16, 4, IndexConfig(seed=5)) for _ in range(2))
    for x in (a, b):
        x.build(K, V)
        x.insert(K[:, :40] * 0.5, V[:, :40])
    assert np.array_equal(a.u, b.u)
    for f in ("tok_level", "tok_parent", "tok_page", "tok_slot", "page_tok", "page_fill", "page_keys", "page_vals"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert np.array_equal(a.query(Q, 12), b.query(Q, 12))
    c = PagedDCIIndex(2, 16, 4, IndexConfig(seed=6))
    assert not np.array_equal(c.u, a.u)


def test_t14_batched_equals_per_head(rng):
    H, n, d = 4, 5000, 16
    K = rng.standard_normal((H, n, d)).astype(np.float32)
    Q = rng.standard_normal((H * 3, d)).astype(np.float32)
    batched = PagedDCIIndex(H, d)
    batched.build(K)
    got = batched.query(Q, 10)
    got_rows, _ = batched.query_rows(Q, np.repeat(np.arange(H), 3), 10)
    for h in range(H):
        single = PagedDCIIndex(1, d)
        single.build(K[h : h + 1])
        assert np.array_equal(single.tok_parent[0, :n], batched.tok_parent[h, :n])
        assert np.array_equal(single.page_tok[0, : single.next_page[0]], batched.page_tok[h, : batched.next_page[h]])
        assert np.array_equal(single.query(Q[h * 3 : (h + 1) * 3], 10)[0], got[h])
        rows, _ = single.query_rows(Q[h * 3 : (h + 1) * 3], np.zeros(3, int), 10)
        assert np.array_equal(rows, got_rows[h * 3 : (h + 1) * 3])


def test_t12_gqa_merge_is_rank_major_first_unique():
    rows = np.array([[5, 1, 7, 9], [5, 2, 1, 8], [3, 4, -1, -1], [4, 3, 6, 0]], np.int32)
    out = merge_group_pages(rows, 2, 4)
    assert out[0].tolist() == [5, 1, 2, 7]  # r0h0=5 r0h1=5(dup) r1h0=1 r1h1=2 r2h0=7
    assert out[1].tolist() == [3, 4, 6, 0]
    short = merge_group_pages(np.array([[1, -1], [1, -1]], np.int32), 2, 3)
    assert short[0].tolist() == [1, -1, -1]


def test_t12_gqa_pages_unique_and_bounded(rng):
    K = rng.standard_normal((2, 4000, 16)).astype(np.float32)
    idx = _built(K, 16, p0=0.01)
    Q = rng.standard_normal((8, 16)).astype(np.float32)
    pages = idx.query(Q, 12)
    rows, _ = idx.query_rows(Q, np.repeat([0, 1], 4), 12)
    for h in range(2):
        live = pages[h][pages[h] >= 0]
        assert len(set(live.tolist())) == len(live) <= 12
        assert np.array_equal(pages[h], merge_group_pages(rows, 4, 12)[h])


def test_policy_budget_in_tokens(rng):
    K = rng.standard_normal((2, 3000, 16)).astype(np.float32)
    pol = IceCachePolicy(page_size=16)
    pol.build(K)
    sel = pol.select(rng.standard_normal((4, 16)).astype(np.float32), 256)
    assert all(0 < len(s) <= 256 and len(np.unique(s)) == len(s) for s in sel)


@pytest.mark.parametrize("bad,arg", [
    (lambda: PagedDCIIndex(0, 16), "num_heads"),
    (lambda: PagedDCIIndex(2, 16, config=IndexConfig(page_size=1)), "page_size"),
    (lambda: IndexConfig(p0=1.5), "p0"),
    (lambda: IndexConfig(rebuild_growth=0.5), "rebuild_growth"),
    (lambda: QueryParams(prop_to_retrieve=0.0), "prop_to_retrieve"),
    (lambda: QueryParams(fov=0), "fov"),
])
def test_bad_parameters_name_the_argument(bad, arg):
    with pytest.raises(ValueError, match=arg):
        bad()


def test_bad_inputs_raise_value_error(rng):
    idx = PagedDCIIndex(2, 8)
    K = rng.standard_normal((2, 100, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="keys"):
        idx.build(K[:, :, :7])
    with pytest.raises(ValueError, match="keys"):
        idx.build(K[0])
    bad = K.copy()
    bad[1, 5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        idx.build(bad)
    bad[1, 5, 3] = np.inf
    with pytest.raises(ValueError, match="keys"):
        idx.build(bad)
    with pytest.raises(ValueError, match="keys"):
        idx.build(np.array([["a"]]))
    with pytest.raises(ValueError, match="values"):
        idx.build(K, np.zeros((2, 100, 4)))
    idx.build(K)
    with pytest.raises(ValueError, match="queries"):
        idx.query(rng.standard_normal((3, 8)), 4)
    with pytest.raises(ValueError, match="queries"):
        idx.query(np.full((2, 8), np.nan), 4)
    with pytest.raises(ValueError, match="n_pages"):
        idx.query(rng.standard_normal((2, 8)), 0)
    with pytest.raises(ValueError, match="row_head"):
        idx.query_rows(rng.standard_normal((2, 8)), np.array([0, 2]), 4)
    with pytest.raises(ValueError, match="positions"):
        idx.insert(K[:, :3], positions=np.array([1.5, 2, 3]))
    with pytest.raises(ValueError, match="token_ids"):
        idx.delete([10**6])
    with pytest.raises(ValueError, match="budget"):
        IceCachePolicy().check_budget(0)


def test_query_batch_equals_separate_queries(rng):
    """Every (index, KV head) pair searched in one parallel call gives each index's own answer, also after
    an index's arrays were replaced (growth, rebuild) and with slots reused after a drop."""
    from icecache_sglang.index.paged_index import StateList, query_batch
    from icecache_sglang.index.synthetic import lowrank_keys

    idxs, qs = [], []
    for n in (40, 700, 1500, 3000):
        K, Q = lowrank_keys(rng, n, 16, heads=2, group=3, n_queries=1)
        idx = PagedDCIIndex(2, 16, config=IndexConfig(page_size=8))
        idx.build(K)
        idxs.append(idx)
        qs.append(Q[0])
    Q = np.stack(qs)
    states = StateList()

    def check():
        got = query_batch(idxs, Q, 5, states=states)
        want = np.stack([idx.query(Q[b], 5) for b, idx in enumerate(idxs)])
        np.testing.assert_array_equal(got, want)

    check()
    version = idxs[0].storage_version
    idxs[0].insert(rng.standard_normal((2, 200, 16)).astype(np.float32))  # 40 -> 240: grows, rebuilds
    assert idxs[0].storage_version > version
    check()
    states.drop(idxs[1])
    idxs[1] = idxs[1].copy()
    idxs[1].delete(np.arange(0, 700, 3))
    check()
    assert len(states) == 4
    for idx in idxs:
        states.drop(idx)
    assert len(states) == 0
    with pytest.raises(ValueError, match="non-empty"):
        query_batch([PagedDCIIndex(2, 16)], Q[:1], 5)
