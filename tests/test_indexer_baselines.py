"""The baseline selections a real indexer process serves beside IceCache's search (``Query.policy``),
against the offline policies and exact scores over the same tokens."""

import numpy as np
import pytest

from icecache_sglang.index.config import IndexConfig
from icecache_sglang.indexer import Indexer
from icecache_sglang.indexer.baselines import BASELINES, select_baseline

S, H, D, C, GROUP, P = 4096, 2, 16, 8, 2, 5


@pytest.fixture(scope="module")
def served():
    """One sequence: a build over 300 slots in position order (a scattered slot layout, as after radix-cache
    reuse), then 45 more inserted as the window slides."""
    ix = Indexer.launch(num_layers=1, num_kv_heads=H, head_dim=D, num_slots=S, index=IndexConfig(page_size=C),
                        timeout_s=10.0, threads=1)
    rng = np.random.default_rng(5)
    ix.store.keys[:] = rng.standard_normal(ix.store.keys.shape).astype(np.float32)
    order = rng.permutation(S)[:345]  # slot of position i
    ix.client.build(7, [0], order[:300])
    ix.client.insert(7, [0], order[300:])
    ix.client.sync()
    q = rng.standard_normal((1, H * GROUP, D)).astype(np.float32)
    yield ix, order, q, ix.store.read(0, order)  # keys [H, n, D] in position order
    ix.close()


def _query(ix, q, policy):
    sel = ix.client.query(0, [7], q, P, policy=policy, timeout_s=10.0)
    assert not sel.fallback, sel.reason
    return sel.pages[0], sel.slots[0]


def _best_positional_pages(keys, q, n):
    """Per KV head: positional pages ranked by exact best score, GQA rank-major merge, first P."""
    out = []
    for h in range(H):
        s = q[h * GROUP: (h + 1) * GROUP] @ keys[h].T  # [g, n]
        npg = -(-n // C)
        pad = np.full((GROUP, npg * C), -np.inf)
        pad[:, :n] = s
        ranked = np.argsort(-pad.reshape(GROUP, npg, C).max(axis=2), axis=1, kind="stable")
        seen = []
        for r in range(npg):
            for g in range(GROUP):
                if ranked[g, r] not in seen and len(seen) < P:
                    seen.append(ranked[g, r])
        out.append(sorted(seen))
    return out


def test_oracle_positional_picks_the_best_fixed_pages(served):
    ix, order, q, keys = served
    pages, slots = _query(ix, q, "oracle_positional")
    want = _best_positional_pages(keys, q[0], len(order))
    for h in range(H):
        assert sorted(pages[h][pages[h] >= 0]) == want[h]
        got = slots[h][slots[h] >= 0]
        expect = np.concatenate([order[p * C: (p + 1) * C] for p in want[h]])
        np.testing.assert_array_equal(np.sort(got), np.sort(expect))


def _quest_bounds(keys, q, n):
    """Quest's bound, from its definition: per KV head, query head and positional page of C tokens (the
    last one partial), ``max over the page's bounding box of <q, k> = sum_d max(q_d * min_d, q_d * max_d)``
    with the per-coordinate min/max over that page's keys. ``[H, GROUP, pages]``, float64."""
    npg = -(-n // C)
    out = np.empty((H, GROUP, npg))
    for h in range(H):
        for p in range(npg):
            page = keys[h, p * C: min((p + 1) * C, n)].astype(np.float64)  # [<=C, D]
            lo, hi = page.min(axis=0), page.max(axis=0)
            for g in range(GROUP):
                qg = q[h * GROUP + g].astype(np.float64)
                out[h, g, p] = np.maximum(qg * lo, qg * hi).sum()
    return out


def test_quest_serves_the_top_pages_by_its_min_max_bound(served):
    ix, order, q, keys = served
    pages, slots = _query(ix, q, "quest")
    bounds = _quest_bounds(keys, q[0], len(order))
    for h in range(H):
        got = pages[h][pages[h] >= 0]
        assert got.size == P == len(set(got.tolist()))
        # the bound really bounds: every key of a page scores at most its page's bound, for every query head
        for p in got:
            for g in range(GROUP):
                assert (keys[h, p * C: (p + 1) * C] @ q[0, h * GROUP + g]).max() <= bounds[h, g, p] + 1e-4
        # GQA: the KV head serves its query heads' rankings together. With top(r) = the union over the
        # group's query heads of each one's r best pages, the P served pages hold every page of top(R-1)
        # and only pages of top(R), R being the first rank at which top(R) reaches P pages.
        ranked = [np.argsort(-bounds[h, g], kind="stable") for g in range(GROUP)]

        def top(r, ranked=ranked):
            return {int(p) for g in range(GROUP) for p in ranked[g][:r]}

        R = next(r for r in range(1, bounds.shape[2] + 1) if len(top(r)) >= P)
        assert top(R - 1) <= set(got.tolist()) <= top(R), (sorted(got), R, sorted(top(R)))
        # each served page carries the slots of its C positions
        for j, p in enumerate(pages[h]):
            if p >= 0:
                row = slots[h, j]
                np.testing.assert_array_equal(np.sort(row[row >= 0]), np.sort(order[p * C: (p + 1) * C]))


def test_streaming_takes_the_most_recent_indexed_tokens(served):
    ix, order, q, _ = served
    pages, slots = _query(ix, q, "streaming")
    for h in range(H):
        np.testing.assert_array_equal(slots[h][slots[h] >= 0], order[-P * C:])


def test_oracle_page_scores_at_least_what_the_index_search_finds_on_the_same_pages(served):
    ix, order, q, keys = served
    pages, slots = _query(ix, q, "oracle_page")
    ice_pages, ice_slots = _query(ix, q, "icecache")
    score = {int(s): keys[:, i] for i, s in enumerate(order)}
    for h in range(H):
        got = slots[h][slots[h] >= 0]
        assert got.size >= P  # P real index pages
        # the oracle's selected tokens carry at least the attention mass IceCache's carry (same layout)
        qs = q[0, h * GROUP: (h + 1) * GROUP]

        def best(sl):
            return sum(max(qs[g] @ score[int(s)][h] for s in sl[sl >= 0]) for g in range(GROUP))
        assert best(slots[h]) >= best(ice_slots[h]) - 1e-4


def test_unknown_policy_is_an_error_reply_not_a_crash(served):
    ix, _, q, _ = served
    sel = ix.client.query(0, [7], q, P, policy="random", timeout_s=10.0)
    assert sel.fallback and "unknown policy" in sel.reason
    assert not ix.client.query(0, [7], q, P, timeout_s=10.0).fallback  # still serving


def test_select_baseline_refuses_unknown_names():
    from icecache_sglang.index.paged_index import PagedDCIIndex

    idx = PagedDCIIndex(1, 4, config=IndexConfig(page_size=C))
    idx.build(np.random.default_rng(0).standard_normal((1, 40, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="unknown baseline"):
        select_baseline(idx, np.ones((1, 4), np.float32), 2, "icecache")
    for policy in BASELINES:
        pages, slots = select_baseline(idx, np.ones((1, 4), np.float32), 2, policy)
        assert pages.shape == (1, 2) and slots.shape == (1, 2, C)


def test_exact_selection_is_the_exact_page_ranking_and_keeps_each_heads_best_page(served):
    """``exact`` (the server's default selection) serves IceCache's pages ranked by exact score: the same
    pages as ``oracle_page``, and every query head's exact best page is among them."""
    ix, order, q, keys = served
    pages, slots = _query(ix, q, "exact")
    o_pages, o_slots = _query(ix, q, "oracle_page")
    np.testing.assert_array_equal(pages, o_pages)
    np.testing.assert_array_equal(slots, o_slots)
    score = {int(s): keys[:, i] for i, s in enumerate(order)}
    for h in range(H):
        chosen = {int(s) for s in slots[h][slots[h] >= 0]}
        for g in range(GROUP):
            qs = q[0, h * GROUP + g]
            best_slot = max(score, key=lambda s: (qs @ score[s][h], -s))
            assert best_slot in chosen


@pytest.mark.parametrize("policy", ["oracle_positional", "quest"])
def test_served_mass_merge_equals_the_offline_policy(served, policy):
    from icecache_sglang.index.selection import OraclePositionalPolicy, QuestPolicy

    ix, order, q, keys = served
    sel = ix.client.query(0, [7], q, P, policy=policy, merge="mass", timeout_s=10.0)
    assert not sel.fallback, sel.reason
    offline = (OraclePositionalPolicy(C) if policy == "oracle_positional" else QuestPolicy(C)).set_merge("mass")
    offline.build(keys)
    for h, toks in enumerate(offline.select(q[0], P * C)):
        assert sorted(sel.pages[0][h][sel.pages[0][h] >= 0]) == sorted(np.unique(toks // C))


@pytest.mark.parametrize("policy", ["exact", "icecache"])
def test_served_mass_merge_keeps_each_query_heads_best_page(served, policy):
    ix, order, q, keys = served
    sel = ix.client.query(0, [7], q, P, policy=policy, merge="mass", timeout_s=10.0)
    assert not sel.fallback, sel.reason
    slot_of = {int(s): i for i, s in enumerate(order)}
    for h in range(H):
        got = {slot_of[int(s)] for s in sel.slots[0][h].ravel() if s >= 0}
        for g in range(GROUP):
            best = int(np.argmax(q[0, h * GROUP + g] @ keys[h].T))
            if policy == "exact":  # the exact scan never misses a query head's best token's page
                assert best in got


def test_unknown_merge_is_an_error_reply_not_a_crash(served):
    ix, _, q, _ = served
    sel = ix.client.query(0, [7], q, P, policy="exact", merge="sum", timeout_s=10.0)
    assert sel.fallback and "unknown merge" in sel.reason
    assert not ix.client.query(0, [7], q, P, policy="exact", timeout_s=10.0).fallback


def _local_service(served):
    from icecache_sglang.indexer import KeyStore, protocol as p
    from icecache_sglang.indexer import service as svc

    ix, order, _, _ = served
    local = svc.IndexerService(ix.config, KeyStore.attach(ix.store.spec))
    local.handle(*p.as_received(0, p.Build(seq=7, layers=[0]), {"slots": order[:300].astype(np.int32)}))
    local.handle(*p.as_received(0, p.Insert(seq=7, layers=[0]), {"slots": order[300:].astype(np.int32)}))
    for seq in (8, 9):  # copy-on-write shares: three sequences in one query
        local.handle(*p.as_received(0, p.Share(src=7, dst=seq, prefix_len=300 - 40 * (seq - 7)), {}))
    return local


def test_a_small_sequences_baseline_runs_on_one_thread_with_the_same_answer(served, monkeypatch):
    """``SERIAL_SCAN_ELEMENTS``: a sequence with few keys has its baseline selection on the query's thread alone
    (waking numba's threads cost more than they saved); the pages are the ones the parallel path returns, and
    the thread's numba thread count is what it was afterwards."""
    import numba

    from icecache_sglang.indexer import protocol as p
    from icecache_sglang.indexer import service as svc

    _, _, q, _ = served
    local = _local_service(served)
    op = p.Query(layer=0, seqs=[7], n_pages=P, policy="quest", merge="mass")
    seen = []
    real = svc.select_baseline
    monkeypatch.setattr(svc, "select_baseline", lambda *a, **k: (seen.append(numba.get_num_threads()), real(*a, **k))[1])
    numba.set_num_threads(2)
    try:
        _, serial = local.handle(*p.as_received(0, op, {"q": q}))
        monkeypatch.setattr(svc, "SERIAL_SCAN_ELEMENTS", 0)  # every sequence on the thread's numba threads
        _, parallel = local.handle(*p.as_received(0, op, {"q": q}))
        assert seen == [1, 2] and numba.get_num_threads() == 2
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert np.array_equal(serial["pages"], parallel["pages"]) and np.array_equal(serial["slots"], parallel["slots"])
    local.close()


@pytest.mark.parametrize("policy", ["exact", "oracle_page"])
def test_small_sequences_exact_scans_run_as_one_batch_with_the_same_answer(served, monkeypatch, policy):
    """The exact scans of a query's small sequences run in one numba call (``index/scan_batch.py``; on one thread
    for fewer than ``SERIAL_BATCH_SEQUENCES``, else one per (sequence, KV head) pair at most), its long ones in a
    second call when there are ``BATCHED_LONG_SEQUENCES`` of them, else one sequence at a time; either way each
    sequence gets the pages and slots ``select_baseline`` gives it."""
    import numba

    from icecache_sglang.indexer import protocol as p
    from icecache_sglang.indexer import service as svc

    ix, _, q, _ = served
    local = _local_service(served)
    seqs = [7, 8, 9]
    qs = np.concatenate([q, q[:, ::-1], -q]).copy()
    op = p.Query(layer=0, seqs=seqs, n_pages=P, policy=policy, merge="mass")
    batched, single, threads = [], [], []
    real_batch, real_single = svc.scan_index_batch, svc.select_baseline
    monkeypatch.setattr(svc, "scan_index_batch", lambda st, idxs, *a, **k: (
        batched.append(len(idxs)), threads.append(numba.get_num_threads()), real_batch(st, idxs, *a, **k))[2])
    monkeypatch.setattr(svc, "select_baseline", lambda *a, **k: (single.append(1), real_single(*a, **k))[1])
    numba.set_num_threads(2)
    try:
        _, together = local.handle(*p.as_received(0, op, {"q": qs}))
        monkeypatch.setattr(svc, "SERIAL_BATCH_SEQUENCES", 3)
        _, parallel = local.handle(*p.as_received(0, op, {"q": qs}))
        assert threads == [1, 2] and numba.get_num_threads() == 2
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert batched == [3, 3] and not single
    batched.clear()
    monkeypatch.setattr(svc, "SERIAL_SCAN_ELEMENTS", 260 * H * D)  # sequence 9 (220 tokens) small, 7 and 8 long
    _, mixed = local.handle(*p.as_received(0, op, {"q": qs}))
    assert batched == [1, 2] and not single  # the small one, then the two long ones together
    monkeypatch.setattr(svc, "BATCHED_LONG_SEQUENCES", 3)  # two long ones are too few: one at a time
    _, long_apart = local.handle(*p.as_received(0, op, {"q": qs}))
    assert batched == [1, 2, 1] and single == [1, 1]
    monkeypatch.setattr(svc, "BATCHED_SCANS", ())
    _, apart = local.handle(*p.as_received(0, op, {"q": qs}))
    assert batched == [1, 2, 1] and len(single) == 5
    for got in (together, parallel, mixed, long_apart):
        assert np.array_equal(got["pages"], apart["pages"]) and np.array_equal(got["slots"], apart["slots"])
    store = local.store.keys[0]
    for b, seq in enumerate(seqs):
        idx = local.table.get(seq, 0)
        pages, slots = real_single(idx, qs[b], P, policy, "mass", store)
        assert np.array_equal(apart["pages"][b], pages) and np.array_equal(apart["slots"][b], slots)
    local.close()


@pytest.mark.parametrize("policy", ["exact", "icecache", "quest"])
@pytest.mark.parametrize("batch_threads", ["one", "all"])
def test_a_sequence_with_a_non_finite_query_gets_no_pages_and_the_others_theirs(served, monkeypatch, policy,
                                                                                 batch_threads):
    """A query row with an infinity or a NaN (a float16 overflow in the model) is answered with its sequence's most
    recent pages (the ``streaming`` baseline's) and counted; the message's other sequences get the pages they get
    alone. Before, the batched exact scan's mass merge raised inside numba: the whole message failed on one thread,
    and with several threads that sequence came back empty without a word."""
    from icecache_sglang.indexer import protocol as p
    from icecache_sglang.indexer import service as svc

    _, _, q, _ = served
    local = _local_service(served)
    monkeypatch.setattr(svc, "SERIAL_BATCH_SEQUENCES", 99 if batch_threads == "one" else 1)
    qs = np.concatenate([q, q[:, ::-1], -q]).copy()
    qs[1, 0, 3] = np.inf
    qs[2, 1, 0] = np.nan
    op = p.Query(layer=0, seqs=[7, 8, 9], n_pages=P, policy=policy, merge="mass")
    res, out = local.handle(*p.as_received(0, op, {"q": qs}))
    for b, seq in ((1, 8), (2, 9)):
        recent = select_baseline(local.table.get(seq, 0), qs[0], P, "streaming")
        assert np.array_equal(out["pages"][b], recent[0]) and np.array_equal(out["slots"][b], recent[1])
        assert (out["slots"][b] >= 0).any()
    assert res.n_tokens == [345, 260, 220]
    alone, alone_out = local.handle(*p.as_received(0, p.Query(layer=0, seqs=[7], n_pages=P, policy=policy,
                                                                merge="mass"), {"q": qs[:1]}))
    assert np.array_equal(out["pages"][0], alone_out["pages"][0]) and (out["pages"][0] >= 0).any()
    assert np.array_equal(out["slots"][0], alone_out["slots"][0])
    assert local.stats().nonfinite_queries == 2
    local.close()
