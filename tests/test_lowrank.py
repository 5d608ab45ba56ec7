"""The exact selection's query-aware low-rank first pass (``index/lowrank.py``, ``selection: lowrank``)."""

import numpy as np
import pytest

from icecache_sglang.index import lowrank
from icecache_sglang.index.config import IndexConfig
from icecache_sglang.index.keys import to_storage
from icecache_sglang.index.paged_index import PagedDCIIndex
from icecache_sglang.index import scan
from icecache_sglang.index.scan import scan_index

H, D, G, P, RANK = 2, 32, 3, 6, 8


def _keys(rng, n, rank=RANK, noise=0.0):
    """Keys ``[H, n, D]`` = mean + a rank-``rank`` part (+ noise): exactly low rank when ``noise`` is 0."""
    K = np.empty((H, n, D), np.float32)
    for h in range(H):
        basis = np.linalg.qr(rng.standard_normal((D, rank)))[0].T * 3.0
        K[h] = rng.standard_normal(D) + rng.standard_normal((n, rank)) @ basis + noise * rng.standard_normal((n, D))
    return K


def lowrank_queries(queries: int, n: int, layer: int) -> int:
    """How many of an index's first ``queries`` queries go through the first pass: the fit starts at query
    ``FIT_AFTER + layer % FIT_STAGGER``, the next ``ceil(n / FIT_CHUNK)`` code it (``FIT_CHUNK`` tokens' worth of
    pages each, and a page more: exact while ``n`` is not within a page per head of a multiple), the last of
    them uses it."""
    first = lowrank.FIT_AFTER + layer % lowrank.FIT_STAGGER + -(-n // lowrank.FIT_CHUNK)
    return max(0, queries - first + 1)


def _index(K, key_dtype="int8"):
    idx = PagedDCIIndex(H, D, config=IndexConfig(page_size=8, key_dtype=key_dtype))
    idx.build(K)
    return idx, np.ascontiguousarray(K.transpose(1, 0, 2))  # the store: row of token t at position t


def _fit(idx, store, rng, merge="mass"):
    for _ in range(lowrank.FIT_AFTER + 8):
        lowrank.scan_index_lowrank(idx, rng.standard_normal((H * G, D)).astype(np.float32), P, store, merge=merge,
                                   rank=RANK)
        if idx.lowrank.ready():
            return
    raise AssertionError("no fit")


def _coded(f, idx) -> float:
    """Tokens per KV head in pages whose codes are current (coded at the index's page version)."""
    n = int(idx.next_page.max())
    current = (f.version[:, :n] == idx.page_version[:, :n]) & (idx.page_cell[:, :n] >= 0)
    return float(idx.page_fill[:, :n][current].sum()) / idx.H


def _mass(idx, K, q, pages):
    """Per KV head, its query heads' mean softmax attention mass on the tokens of ``pages [H, P]``."""
    out = []
    for h in range(H):
        toks = np.concatenate(idx.page_tokens(h, pages[h][pages[h] >= 0]))
        s = q[h * G:(h + 1) * G] @ K[h].T / np.sqrt(D)
        w = np.exp(s - s.max(axis=1, keepdims=True))
        out.append((w[:, toks].sum(1) / w.sum(1)).mean())
    return np.array(out)


def test_low_rank_keys_give_the_exact_scans_pages():
    """Rank merge: exactly the exact scan's pages. Mass merge: chosen among the candidates only (the exact
    scan's softmax also counts every other page), so the same attention mass, not always the same pages."""
    rng = np.random.default_rng(0)
    K = _keys(rng, lowrank.MIN_TOKENS + 500)
    idx, store = _index(K)
    _fit(idx, store, rng)
    assert idx.lowrank.fits == 1
    for _ in range(5):
        q = rng.standard_normal((H * G, D)).astype(np.float32)
        got = lowrank.scan_index_lowrank(idx, q, P, store, merge="rank")
        want = scan_index(idx, q, P, merge="rank", store=store)
        assert [sorted(r) for r in got] == [sorted(r) for r in want]
        # queries that attend (each towards some token, as a retrieval head does): with flat attention the
        # mass merge's softmax over the candidates alone weighs the query heads differently from the exact
        # scan's over every page, and both capture little mass anyway
        toward = K[:, rng.integers(0, K.shape[1], H * G)[::H]] - K.mean(axis=1, keepdims=True)  # [H, G, D]
        q = (3 * toward.reshape(H * G, D) + rng.standard_normal((H * G, D))).astype(np.float32)
        got = lowrank.scan_index_lowrank(idx, q, P, store, merge="mass")
        want = scan_index(idx, q, P, merge="mass", store=store)
        assert (_mass(idx, K, q, got) >= 0.97 * _mass(idx, K, q, want)).all()


def test_candidates_carry_approximate_page_maxima_and_the_rescoring_decides():
    """Keys with a small full-rank part: each query row's candidates are distinct pages, best first, with
    approximate scores close to the pages' exact maxima; the exact best page of every query head is among
    them, and the selection keeps it (the rescoring picks among candidates by exact scores)."""
    rng = np.random.default_rng(1)
    K = _keys(rng, lowrank.MIN_TOKENS + 100, noise=0.05)
    idx, store = _index(K)
    _fit(idx, store, rng)
    q = rng.standard_normal((H * G, D)).astype(np.float32)
    X = lowrank.lowrank_rescore_count(P)
    cand, approx = lowrank.candidates(idx, q, X)
    assert cand.shape == (H * G, X) and (np.diff(approx, axis=1) <= 0).all()
    for h in range(H):
        live = idx.live_pages(h)
        toks = idx.page_tok[h, live]
        valid = np.arange(idx.C)[None] < idx.page_fill[h, live][:, None]
        exact = np.where(valid[None], np.einsum("gd,pcd->gpc", q[h * G:(h + 1) * G], K[h][np.maximum(toks, 0)]),
                         -np.inf).max(2)  # [g, live pages]
        for j in range(G):
            row = cand[h * G + j]
            assert len(set(row.tolist())) == X  # distinct
            e = exact[j, np.searchsorted(live, row)]
            assert np.abs(approx[h * G + j] - e).max() < 0.05 * np.abs(exact).max() + 0.5
            assert live[np.argmax(exact[j])] in row
        got = lowrank.scan_index_lowrank(idx, q, P, store, merge="mass")[h]
        assert set(live[np.argmax(exact, axis=1)]) <= set(got)


def test_before_the_fit_and_for_short_indexes_the_exact_scan_answers():
    rng = np.random.default_rng(2)
    short, s_store = _index(_keys(rng, lowrank.MIN_TOKENS - 1))
    q = rng.standard_normal((H * G, D)).astype(np.float32)
    assert (lowrank.scan_index_lowrank(short, q, P, s_store) == scan_index(short, q, P, store=s_store)).all()
    assert short.lowrank is None  # no state, no codes for a short index
    idx, store = _index(_keys(rng, lowrank.MIN_TOKENS, noise=0.5))
    for i in range(lowrank.FIT_AFTER):
        q = rng.standard_normal((H * G, D)).astype(np.float32)
        got = lowrank.scan_index_lowrank(idx, q, P, store, merge="mass")
        assert (got == scan_index(idx, q, P, merge="mass", store=store)).all()
        assert idx.lowrank.queries == i + 1 and idx.lowrank.active is None


def test_a_fit_is_encoded_over_several_queries_and_used_only_once_complete(monkeypatch):
    n = lowrank.MIN_TOKENS + 300
    chunk = -(-n // 3)
    monkeypatch.setattr(lowrank, "FIT_CHUNK", chunk)
    rng = np.random.default_rng(3)
    idx, store = _index(_keys(rng, n, noise=0.3))
    seen = []
    for _ in range(lowrank.FIT_AFTER + 6):
        q = rng.standard_normal((H * G, D)).astype(np.float32)
        got = lowrank.scan_index_lowrank(idx, q, P, store, merge="mass")
        st = idx.lowrank
        seen.append((_coded(st.pending, idx) if st.pending is not None else None, st.ready()))
        if not st.ready():
            assert (got == scan_index(idx, q, P, merge="mass", store=store)).all()
    # query FIT_AFTER starts the fit, the next ones code a third of the tokens each (in whole pages: the pages
    # that start within the budget), the third completes it
    fitting = [s for s in seen if s[0] is not None]
    assert [ready for _, ready in fitting] == [False] * 3 and fitting[0][0] == 0
    assert chunk <= fitting[1][0] < chunk + idx.C and 2 * chunk <= fitting[2][0] < 2 * chunk + 2 * idx.C
    assert seen[-1] == (None, True) and idx.lowrank.fits == 1 and _coded(idx.lowrank.active, idx) == n


def test_tokens_inserted_after_the_fit_are_coded_and_can_be_selected():
    rng = np.random.default_rng(4)
    K = _keys(rng, lowrank.MIN_TOKENS + 40)
    mid = K.mean(axis=1)
    u = K[:, -1] - mid
    K[:, -1] = mid + 8 * u  # far out along its own direction (and still in the keys' subspace): the best key of u
    idx, store = _index(K[:, : lowrank.MIN_TOKENS])
    _fit(idx, store, np.random.default_rng(40))
    new = idx.insert(K[:, lowrank.MIN_TOKENS:])  # positions continue: rows of the same store
    store = np.ascontiguousarray(K.transpose(1, 0, 2))
    f = idx.lowrank.active
    stale = _coded(f, idx)
    assert stale < idx.n_tokens  # the pages the new tokens joined are coded at the next query
    q = np.repeat(u, G, axis=0)
    served = idx.lowrank.served
    got = lowrank.scan_index_lowrank(idx, q, P, store, merge="mass", page_stage=lowrank.PAGE_STAGE_FACTOR)
    assert idx.lowrank.served == served + 1 and _coded(f, idx) == idx.n_tokens and lowrank.uses_page_stage(
        idx, lowrank.lowrank_rescore_count(P), lowrank.PAGE_STAGE_FACTOR)
    for h in range(H):
        assert idx.tok_page[h, new[-1]] in got[h]
    # every token scored (keys of rank RANK: the codes are exact up to int8): the exact scan's pages
    got = lowrank.scan_index_lowrank(idx, q, P, store, merge="rank")
    want = scan_index(idx, q, P, merge="rank", store=store)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]


def test_deleted_tokens_are_never_scored_and_a_rebuild_codes_every_page_again():
    rng = np.random.default_rng(5)
    K = _keys(rng, lowrank.MIN_TOKENS + 64)
    idx, store = _index(K[:, : lowrank.MIN_TOKENS])
    _fit(idx, store, rng)
    store = np.ascontiguousarray(K.transpose(1, 0, 2))
    idx.delete(np.arange(0, 64))
    q = np.repeat(K[:, 10] - K.mean(axis=1), G, axis=0)  # towards a deleted token
    cand, _ = lowrank.candidates(idx, q, 8)
    for h in range(H):
        assert not np.isin(np.concatenate(idx.page_tokens(h, cand[h * G][cand[h * G] >= 0])), np.arange(64)).any()
    got = lowrank.scan_index_lowrank(idx, q, P, store, merge="rank")
    for h in range(H):
        chosen = np.concatenate(idx.page_tokens(h, got[h][got[h] >= 0]))
        assert chosen.size and not np.isin(chosen, np.arange(64)).any()
    idx, store = _index(K[:, : lowrank.MIN_TOKENS])
    _fit(idx, store, rng)
    store = np.ascontiguousarray(K.transpose(1, 0, 2))
    idx.cfg = IndexConfig(page_size=8, key_dtype="int8", rebuild_growth=1.001)
    idx.insert(K[:, lowrank.MIN_TOKENS:])  # 0.4% more tokens: rebuilt
    assert idx.rebuilds == 1 and _coded(idx.lowrank.active, idx) == 0  # every page's version moved
    for _ in range(2 + -(-idx.n_tokens // lowrank.FIT_CHUNK)):  # coded again over the next queries
        q = rng.standard_normal((H * G, D)).astype(np.float32)
        got = lowrank.scan_index_lowrank(idx, q, P, store, merge="rank")
        want = scan_index(idx, q, P, merge="rank", store=store)
        assert [sorted(r) for r in got] == [sorted(r) for r in want]
    assert idx.lowrank.ready() and idx.lowrank.fits == 1 and _coded(idx.lowrank.active, idx) == idx.n_live


def test_a_copy_owns_its_codes_and_a_build_drops_them():
    rng = np.random.default_rng(6)
    K = _keys(rng, lowrank.MIN_TOKENS + 8)
    idx, store = _index(K[:, : lowrank.MIN_TOKENS])
    _fit(idx, store, rng)
    twin = idx.copy()
    assert twin.lowrank is not idx.lowrank and twin.lowrank.active.codes is not idx.lowrank.active.codes
    before = idx.lowrank.active.codes.copy()
    twin.insert(K[:, lowrank.MIN_TOKENS:])
    lowrank.scan_index_lowrank(twin, rng.standard_normal((H * G, D)).astype(np.float32), P, store, merge="mass")
    assert _coded(twin.lowrank.active, twin) == lowrank.MIN_TOKENS + 8 == twin.n_tokens
    assert _coded(idx.lowrank.active, idx) == lowrank.MIN_TOKENS and (idx.lowrank.active.codes == before).all()
    assert twin.nbytes() > idx.nbytes() - idx.lowrank.nbytes()  # the codes are counted
    idx.build(K)
    assert idx.lowrank is None


def test_query_aware_maps_beat_the_keys_pca_when_queries_weigh_a_quiet_channel():
    """Keys vary a lot along channel 0 and little along channel 1; queries look only at channel 1. A rank-1
    PCA of the keys keeps channel 0 and ranks tokens at random; the query-aware map keeps channel 1."""
    rng = np.random.default_rng(7)
    n, d = 4000, 8
    K = rng.standard_normal((1, n, d)).astype(np.float32) * np.array([10, 1, .1, .1, .1, .1, .1, .1], np.float32)
    Q = np.zeros((64, d), np.float32)
    Q[:, 1] = rng.standard_normal(64) + 3
    moment = (Q.T @ Q / 64)[None]
    mean, kmap, qmap = lowrank.fit_maps(K, moment, 1)
    exact = Q[:1] @ K[0].T
    aware = (Q[:1] @ qmap[0]) @ ((K[0] - mean[0]) @ kmap[0]).T
    plain = lowrank.fit_maps(K, np.eye(d, dtype=np.float32)[None], 1)
    naive = (Q[:1] @ plain[2][0]) @ ((K[0] - plain[0][0]) @ plain[1][0]).T
    assert np.corrcoef(aware[0], exact[0])[0, 1] > 0.99
    assert abs(np.corrcoef(naive[0], exact[0])[0, 1]) < 0.2


def test_bad_queries_are_refused():
    rng = np.random.default_rng(8)
    idx, store = _index(_keys(rng, 300))
    with pytest.raises(ValueError, match="Q must be"):
        lowrank.scan_index_lowrank(idx, np.zeros((H * G, D + 1), np.float32), P, store)
    with pytest.raises(ValueError, match="rank"):
        lowrank.LowRankState(H, D, D + 1)


def test_served_lowrank_selection_equals_the_exact_one_after_the_fit():
    """Through a real indexer process: ``policy="lowrank"`` answers like ``exact`` before and after the
    sequence's codes are fitted (low-rank keys), in a bfloat16 store as the server's."""
    from icecache_sglang.indexer import Indexer

    n = lowrank.MIN_TOKENS + 200
    ix = Indexer.launch(num_layers=1, num_kv_heads=H, head_dim=D, num_slots=n + 8,
                        index=IndexConfig(page_size=8, key_dtype="int8"), timeout_s=20.0, threads=1)
    try:
        rng = np.random.default_rng(9)
        K = _keys(rng, n)
        ix.store.keys[0, :n] = to_storage(np.ascontiguousarray(K.transpose(1, 0, 2)), "bfloat16") \
            if ix.store.keys.dtype == np.uint16 else K.transpose(1, 0, 2)
        ix.client.build(3, [0], np.arange(n))
        ix.client.build(4, [0], np.arange(n))  # the same keys, asked through the page stage
        ix.client.sync()
        for step in range(lowrank.FIT_AFTER + 4):
            q = rng.standard_normal((1, H * G, D)).astype(np.float32)
            got = ix.client.query(0, [3], q, P, policy="lowrank", merge="rank", timeout_s=20.0)
            want = ix.client.query(0, [3], q, P, policy="exact", merge="rank", timeout_s=20.0)
            paged = ix.client.query(0, [4], q, P, policy="lowrank_pages", merge="rank", timeout_s=20.0)
            assert not got.fallback and not want.fallback and not paged.fallback, (got.reason, want.reason, paged.reason)
            assert [sorted(r) for r in got.pages[0]] == [sorted(r) for r in want.pages[0]], step
            assert all(len(set(r.tolist())) == P and (r >= 0).all() for r in paged.pages[0])
        st = ix.client.stats(timeout_s=10.0)
        assert st.lowrank_indexes == 2 and 0 < st.lowrank_bytes < st.index_bytes
        assert st.lowrank_rows == 2 * lowrank_queries(lowrank.FIT_AFTER + 4, n, layer=0)
    finally:
        ix.close()


def test_a_bad_query_is_left_out_of_the_fit():
    rng = np.random.default_rng(10)
    idx, store = _index(_keys(rng, lowrank.MIN_TOKENS + 10))
    bad = np.full((H * G, D), np.nan, np.float32)
    lowrank.scan_index_lowrank(idx, rng.standard_normal((H * G, D)).astype(np.float32), P, store)
    idx.lowrank.observe(bad)
    assert idx.lowrank.queries == 1 and np.isfinite(idx.lowrank.q_moment).all()
    _fit(idx, store, rng)
    assert idx.lowrank.fits == 1


def test_layers_start_their_fits_on_different_queries():
    rng = np.random.default_rng(11)
    base, store = _index(_keys(rng, lowrank.MIN_TOKENS + 10))
    started = {}
    for layer in (0, 3, lowrank.FIT_STAGGER + 3):
        idx = base.copy()
        for i in range(1, lowrank.FIT_AFTER + lowrank.FIT_STAGGER + 1):
            lowrank.scan_index_lowrank(idx, rng.standard_normal((H * G, D)).astype(np.float32), P, store, layer=layer)
            if idx.lowrank.pending is not None or idx.lowrank.active is not None:
                started[layer] = i
                break
    assert started == {0: lowrank.FIT_AFTER, 3: lowrank.FIT_AFTER + 3, lowrank.FIT_STAGGER + 3: lowrank.FIT_AFTER + 3}


def test_large_budgets_and_indexes_cut_below_the_threshold_are_scanned_exactly():
    rng = np.random.default_rng(12)
    K = _keys(rng, lowrank.MIN_TOKENS + 200, noise=0.3)
    idx, store = _index(K)
    _fit(idx, store, rng)
    q = rng.standard_normal((H * G, D)).astype(np.float32)
    big = int(idx.next_page.min()) // (2 * G * lowrank.LOWRANK_RESCORE_FACTOR) + 1  # candidates: half the pages
    assert (lowrank.scan_index_lowrank(idx, q, big, store, merge="mass")
            == scan_index(idx, q, big, merge="mass", store=store)).all()
    idx.delete(np.arange(400))  # a prefix cut below the threshold
    assert (lowrank.scan_index_lowrank(idx, q, P, store, merge="mass")
            == scan_index(idx, q, P, merge="mass", store=store)).all()


def _over_every_page(idx, q, cand, store, merge):
    """The selection as if every page had a column: page maxima of the whole page copy, every page outside a
    KV head's candidates at -inf, then the rescoring and merge of the exact scan over those columns."""
    g = q.shape[0] // H
    Qs = idx.scaled_queries(q, np.repeat(np.arange(H), g))
    best = scan.page_maxima(idx.page_keys.reshape(H, idx.page_keys.shape[1], -1), idx.page_fill, idx.next_page, Qs,
                            scan.CHUNK_PAGES)
    for h in range(H):
        keep = np.zeros(best.shape[1], bool)
        keep[cand[h * g:(h + 1) * g][cand[h * g:(h + 1) * g] >= 0]] = True
        best[h * g:(h + 1) * g, ~keep] = -np.inf
    if idx.page_keys.dtype == np.int8:
        scan.rescore_best(best, idx.page_fill, idx.next_page, q, scan.ExactKeys(store, idx.positions, idx.page_tok),
                          scan.rescore_count(P), merge)
    return scan.merged_pages(best, idx.page_fill, idx.next_page, g, P, merge, D)


@pytest.mark.parametrize("key_dtype", ["int8", "float32"])
@pytest.mark.parametrize("merge", ["rank", "mass"])
def test_candidate_columns_choose_what_a_column_per_page_would(key_dtype, merge):
    """The candidates are scored, rescored and merged as a few columns per KV head (``candidate_columns``):
    the pages, in order, equal those of the same steps over a column per page with every other page at -inf,
    ties included (keys drawn from 40 distinct rows: many pages share their best score, and a tie goes to the
    lower page id)."""
    rng = np.random.default_rng(14)
    K = _keys(rng, 40, noise=0.2)[:, rng.integers(0, 40, lowrank.MIN_TOKENS + 300)]
    idx, store = _index(np.ascontiguousarray(K), key_dtype)
    _fit(idx, store, rng, merge)
    X = lowrank.lowrank_rescore_count(P)
    for _ in range(4):
        q = rng.standard_normal((H * G, D)).astype(np.float32)
        cand, _ = lowrank.candidates(idx, q, X)
        cols, fill, tok, count = lowrank.candidate_columns(cand, G, idx.page_fill, idx.page_tok)
        for h in range(H):
            want = np.unique(cand[h * G:(h + 1) * G][cand[h * G:(h + 1) * G] >= 0])
            assert count[h] == want.size and (cols[h, :count[h]] == want).all() and (cols[h, count[h]:] == -1).all()
            assert (fill[h, :count[h]] == idx.page_fill[h, want]).all() and (tok[h, :count[h]] == idx.page_tok[h, want]).all()
        served = idx.lowrank.served
        got = lowrank.scan_index_lowrank(idx, q, P, store, merge=merge)
        assert idx.lowrank.served == served + 1
        assert (got == _over_every_page(idx, q, cand, store, merge)).all()


def _check_summaries(f, ix):
    """Each live page's summary row is the mean of its live tokens' decoded codes, then their standard deviations
    in the leading ``spread_rank(r)`` values, and nothing more (``r + spread_rank(r)`` values per page)."""
    r = f.codes.shape[3]
    ns = lowrank.spread_rank(r)
    assert f.summary.shape[2] == r + ns and ns == min(lowrank.SPREAD_RANK, r)
    for h in range(ix.H):
        for p in ix.live_pages(h):
            k = ix.page_fill[h, p]
            live = ix.alive[ix.page_tok[h, p, :k]]
            dec = f.codes[h, p, :k][live].astype(np.float32) * f.scales[h, p, :k][live, None]
            np.testing.assert_allclose(f.summary[h, p, :r], dec.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(f.summary[h, p, r:], dec[:, :ns].std(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [4, 16])
def test_summaries_keep_deviations_of_the_leading_values_at_any_rank(rank):
    """Codes of fewer values than ``SPREAD_RANK`` keep a deviation for each; of more, for the leading
    ``SPREAD_RANK`` only (the rank the other tests use equals it), every page's row as wide as that."""
    rng = np.random.default_rng(20 + rank)
    K = _keys(rng, 3000, noise=0.3)
    idx, store = _index(K)
    idx.delete(rng.choice(3000, 300, replace=False))  # dead tokens inside pages
    q = rng.standard_normal((H, D, D)).astype(np.float32)
    maps = lowrank.fit_maps(np.ascontiguousarray(K[:, ::4]), q @ q.transpose(0, 2, 1), rank)
    f = lowrank._Fit(*maps, idx.page_fill.shape[1], idx.C)
    assert f.refresh(idx)
    _check_summaries(f, idx)


def test_codes_and_summaries_follow_every_page_change():
    """Each refresh codes again the pages whose version moved: after inserts that split and shift pages,
    deletions that merge and borrow, a copy and a rebuild, the codes, scales and summaries of every live page
    equal those of a fit coded from scratch (and each summary is the mean of its page's live decoded codes, then
    their standard deviations in the leading values)."""
    rng = np.random.default_rng(15)
    K = _keys(rng, lowrank.MIN_TOKENS + 3000, noise=0.3)
    idx, store = _index(K[:, : lowrank.MIN_TOKENS])
    _fit(idx, store, rng)
    n = lowrank.MIN_TOKENS

    def check(ix):
        f = ix.lowrank.active
        assert f.refresh(ix)
        fresh = lowrank._Fit(f.mean, f.kmap, f.qmap, ix.page_fill.shape[1], ix.C)
        assert fresh.refresh(ix)
        for h in range(H):
            for p in ix.live_pages(h):
                k = ix.page_fill[h, p]
                assert (f.codes[h, p, :k] == fresh.codes[h, p, :k]).all() and (f.scales[h, p, :k] == fresh.scales[h, p, :k]).all()
        _check_summaries(f, ix)

    for step in range(6):  # decode-like inserts, then larger ones (splits, shifts into neighbours)
        b = 1 if step < 3 else 400
        idx.insert(K[:, n:n + b])
        n += b
        check(idx)
    idx.delete(rng.choice(n, 700, replace=False))  # pages under C/2 borrow or merge
    check(idx)
    twin = idx.copy()
    twin.insert(K[:, n:n + 300])
    check(twin)
    check(idx)
    idx.cfg = IndexConfig(page_size=8, key_dtype="int8", rebuild_growth=1.001)
    idx.insert(K[:, n:n + 100])  # rebuilt: every page id reassigned, every version moved
    n += 100
    assert idx.rebuilds == 1
    check(idx)
    # after a rebuild into fewer pages than before, grown page ids must not restart at old versions (the fit
    # holds those ids at their old versions): decode inserts, each checked
    idx.cfg = IndexConfig(page_size=8, key_dtype="int8", rebuild_growth=None)
    for _ in range(6):
        idx.insert(K[:, n:n + 40])
        n += 40
        check(idx)


def test_grown_page_ids_start_past_every_version_so_far():
    """A rebuild packs the pages into fewer ids than before; the ids it grows back into must come at versions
    never seen, or a copy of a page's data kept at its old version would look current."""
    rng = np.random.default_rng(18)
    idx = PagedDCIIndex(1, 8, config=IndexConfig(page_size=8, rebuild_growth=None))
    idx.build(rng.standard_normal((1, 400, 8)).astype(np.float32))
    for _ in range(30):
        idx.insert(rng.standard_normal((1, 20, 8)).astype(np.float32))
    before = idx.page_version.copy()
    idx.cfg = IndexConfig(page_size=8, rebuild_growth=1.001)
    idx.insert(rng.standard_normal((1, 1, 8)).astype(np.float32))  # rebuilt
    assert idx.rebuilds == 1
    k = min(before.shape[1], idx.page_version.shape[1])
    assert (idx.page_version[:, :k] > before.max()).all()  # every id, allocated or not
    idx.cfg = IndexConfig(page_size=8, rebuild_growth=None)
    idx._grow(idx.n_tokens, idx.page_version.shape[1] + 50)
    assert (idx.page_version[:, k:] > before.max()).all()


def test_the_first_pass_keeps_each_rows_best_pages_over_four_rows_at_a_time():
    """``lowrank_candidates`` against a brute-force reference: groups of 1, 4, 5 and 8 query rows (the four-row
    and one-row loops), runs of pages, dead tokens, part-filled and free pages, a page list per head of its own
    length, and more candidates than pages."""
    rng = np.random.default_rng(19)
    for trial in range(12):
        Hs, g, C, r = int(rng.integers(1, 4)), [1, 4, 5, 8][trial % 4], 8, 8
        n, X = int(rng.integers(5, 200)), int(rng.choice([1, 3, 16, 400]))
        codes = rng.integers(-127, 128, (Hs, n, C, r)).astype(np.int8)
        scales = rng.random((Hs, n, C)).astype(np.float32)
        page_fill = rng.integers(0, C + 1, (Hs, n)).astype(np.int32)
        page_cell = np.where(rng.random((Hs, n)) < 0.1, -1, 0).astype(np.int32)
        page_tok = rng.permutation(Hs * n * C + 5)[:Hs * n * C].reshape(Hs, n, C).astype(np.int32)
        alive = rng.random(Hs * n * C + 5) < 0.8
        next_page = rng.integers(1, n + 1, Hs).astype(np.int32)
        next_page[0] = n
        use = (rng.random((Hs, n)) < 0.6).astype(np.uint8)
        Qr = rng.standard_normal((Hs * g, r)).astype(np.float32)
        qmu = rng.standard_normal(Hs * g).astype(np.float32)
        pages, scores = lowrank.lowrank_candidates(codes, scales, page_tok, page_fill, page_cell, next_page, alive, use,
                                                   Qr, qmu, X, int(rng.integers(1, 4)))
        for row in range(Hs * g):
            h = row // g
            best = {}
            for p in range(next_page[h]):
                if use[h, p] and page_cell[h, p] >= 0:
                    for j in range(page_fill[h, p]):
                        if alive[page_tok[h, p, j]]:
                            v = codes[h, p, j].astype(np.float32) @ Qr[row] * scales[h, p, j] + qmu[row]
                            best[p] = max(best.get(p, -np.inf), v)
            ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
            want = ranked[:X]
            got = [(int(p), float(v)) for p, v in zip(pages[row], scores[row]) if p >= 0]
            assert len(got) == len(want) and (pages[row, len(got):] == -1).all()
            np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-4, atol=1e-4)
            if len(ranked) <= X or ranked[X - 1][1] - ranked[X][1] > 1e-4 * max(1.0, abs(ranked[X][1])):
                assert {p for p, _ in got} == {p for p, _ in want}  # (a near-tie at the X-th may go either way)


def test_summary_pages_mark_every_rows_best_pages():
    """The page stage marks, per KV head, every page some query row ranks among its Y best by summary score
    (the mean code's score plus ``SPREAD_WEIGHT`` x the leading deviations weighted by |q|; ties at the cut
    included), not many more, never a free page; a head with fewer pages than Y has all marked."""
    rng = np.random.default_rng(16)
    Hs, g, r, n = 3, 5, 12, 700
    ns = lowrank.spread_rank(r)
    summary = rng.standard_normal((Hs, n, r + ns)).astype(np.float32)
    summary[..., r:] = 2 * np.abs(summary[..., r:])  # deviations, large enough to change the ranking
    summary[0, 100:140] = summary[0, 99]  # ties
    page_cell = np.zeros((Hs, n), np.int32)
    page_cell[1, rng.choice(n, 50, replace=False)] = -1  # free pages
    page_fill = np.full((Hs, n), 8, np.int32)
    next_page = np.array([n, n, 30], np.int32)  # head 2: fewer pages than Y
    Qr = rng.standard_normal((Hs * g, r)).astype(np.float32)
    qmu = rng.standard_normal(Hs * g).astype(np.float32)
    Y = 40
    for runs in (1, 3):
        use = lowrank.summary_pages(summary, page_cell, page_fill, next_page, Qr, qmu, Y, runs)
        for h in range(Hs):
            m = int(next_page[h])
            ok = (page_cell[h, :m] >= 0) & (page_fill[h, :m] > 0)
            assert not use[h, m:].any() and not use[h, :m][~ok].any()
            want = np.zeros(m, bool)
            for j in range(g):
                q = Qr[h * g + j]
                s = summary[h, :m, :r] @ q + lowrank.SPREAD_WEIGHT * summary[h, :m, r:] @ np.abs(q[:ns])
                s += qmu[h * g + j]
                s[~ok] = -np.inf
                if ok.sum() <= Y:
                    want |= ok
                else:
                    want |= s >= np.sort(s[ok])[-Y]
            assert (use[h, :m].astype(bool) >= want).all()  # every row's best
            assert use[h].sum() <= g * (Y + Y // 2) + 40  # and not every page (40: the tied run)
            if h == 1:  # the deviations count: by the mean codes alone, another set of pages
                alone = lowrank.summary_pages(summary, page_cell, page_fill, next_page, Qr, qmu, Y, runs, 0.0)
                assert (alone[h] != use[h]).sum() > Y
    for wrong in (5, r + 1, r + 2, r + ns):  # rows of another rank: means and deviations would not line up
        with pytest.raises(ValueError, match="deviations"):
            lowrank.summary_pages(summary, page_cell, page_fill, next_page, Qr[:, :1].repeat(wrong, 1), qmu, Y, 1)
    # a tie across the cut: 30 pages above it, 100 at the Y-th score, the rest below: all 130 marked
    tied = np.concatenate([np.full(30, 5.0), np.full(100, 1.0), rng.random(500) * 0.5]).astype(np.float32)
    flat = np.stack([tied, np.zeros_like(tied)], 1)[None]  # rank 1: a mean and a deviation (zero) per page
    use = lowrank.summary_pages(flat, np.zeros((1, 630), np.int32), np.full((1, 630), 8, np.int32),
                                np.array([630], np.int32), np.ones((1, 1), np.float32), np.zeros(1, np.float32), 40, 1)
    assert (use[0].astype(bool) == (tied >= 1.0)).all()
    # scores over many scales (heavy tails): still the Y best, not every page
    heavy = np.exp(10 * np.random.default_rng(299).standard_normal((1, 1500, 1))).astype(np.float32)
    heavy2 = np.concatenate([heavy, np.zeros_like(heavy)], 2)
    for Yh in (10, 100):  # (4 levels of 64 bins alone marked all 1500 pages at Y = 100)
        use = lowrank.summary_pages(heavy2, np.zeros((1, 1500), np.int32), np.full((1, 1500), 8, np.int32),
                                    np.array([1500], np.int32), np.ones((1, 1), np.float32), np.zeros(1, np.float32),
                                    Yh, 1)
        assert use[0, np.argsort(-heavy[0, :, 0])[:Yh]].all() and use[0].sum() <= Yh + Yh // 2


def test_the_page_stage_scores_only_the_marked_pages():
    """With the page stage the first pass returns, per query row, the X best pages by approximate score among
    the pages the stage marked for its KV head (the same pass as over every page, restricted)."""
    rng = np.random.default_rng(17)
    K = _keys(rng, lowrank.MIN_TOKENS + 100, noise=0.2)
    idx, store = _index(K)
    _fit(idx, store, rng)
    f = idx.lowrank.active
    X, stage = lowrank.lowrank_rescore_count(P), lowrank.PAGE_STAGE_FACTOR
    assert lowrank.uses_page_stage(idx, X, stage) and not lowrank.uses_page_stage(idx, X, 0)
    q = rng.standard_normal((H * G, D)).astype(np.float32)
    cand, approx = lowrank.candidates(idx, q, X, stage)
    Qr, qmu = lowrank.project_queries(q, f.mean, f.qmap)
    use = lowrank.summary_pages(f.summary, idx.page_cell, idx.page_fill, idx.next_page, Qr, qmu, stage * X, 1)
    assert 0 < use.sum() < idx.next_page.sum() // 2
    for h in range(H):
        pages = np.flatnonzero(use[h])
        dec = f.codes[h, pages].astype(np.float32) * f.scales[h, pages][..., None]  # [pages, C, r]
        valid = np.arange(idx.C)[None] < idx.page_fill[h, pages][:, None]
        for j in range(G):
            row = h * G + j
            s = np.where(valid, dec @ Qr[row] + qmu[row], -np.inf).max(1)
            best = pages[np.argsort(-s, kind="stable")[:X]]
            assert set(cand[row].tolist()) == set(best.tolist())
            np.testing.assert_allclose(approx[row], np.sort(s)[::-1][:X], rtol=1e-4, atol=1e-4)


def test_timings_name_every_part_of_a_first_pass_call_and_change_nothing():
    """``timings`` receives the seconds of each part (``PARTS``) of a call through the first pass, with and without
    the page stage, and the pages chosen are those of the call without it; an exact-scan call times nothing past
    the codes."""
    rng = np.random.default_rng(18)
    K = _keys(rng, lowrank.MIN_TOKENS + 100, noise=0.2)
    idx, store = _index(K)
    _fit(idx, store, rng)
    q = rng.standard_normal((H * G, D)).astype(np.float32)
    for stage in (0, lowrank.PAGE_STAGE_FACTOR):
        want = lowrank.scan_index_lowrank(idx.copy(), q, P, store, page_stage=stage)
        t = {}
        got = lowrank.scan_index_lowrank(idx.copy(), q, P, store, page_stage=stage, timings=t)
        assert (got == want).all()
        assert set(t) == set(lowrank.PARTS) and all(v >= 0 for v in t.values())
    t = {}  # too large a budget: the exact scan answers
    lowrank.scan_index_lowrank(idx, q, idx.next_page.min(), store, timings=t)
    assert set(t) == {"codes"}
