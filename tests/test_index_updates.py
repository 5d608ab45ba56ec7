"""T6/T7 tree and page invariants, T8 insert/delete consistency (1000 random operations), T9 growth of
the max norm, page splits, dirty flags, physical page contents, and the rebuild policy."""

import numpy as np
import pytest
from conftest import EXHAUSTIVE, int_keys, oracle_pages

from icecache_sglang.index.config import IndexConfig, QueryParams
from icecache_sglang.index.invariants import check_invariants
from icecache_sglang.index.paged_index import PagedDCIIndex
from icecache_sglang.index.schedule import schedule_levels


def test_t6_t7_after_build(rng):
    K = rng.standard_normal((3, 20000, 16)).astype(np.float32)
    V = rng.standard_normal((3, 20000, 8)).astype(np.float32)
    idx = PagedDCIIndex(3, 16, 8, IndexConfig(page_size=16))
    idx.build(K, V)
    check_invariants(idx, reference_keys=K)
    sizes = np.bincount(schedule_levels(20000, 0.01, 0.2))
    assert all(idx.level_counts[h, : sizes.size].tolist() == sizes.tolist() for h in range(3))
    for h in range(3):
        # bulk fills of every cell differ by at most one
        cell_first = idx.cell_array("cell_first", h)
        for cell in [0] + list(range(1, 20001)):
            fills, p = [], cell_first[cell]
            while p >= 0:
                fills.append(idx.page_fill[h, p])
                p = idx.page_next[h, p]
            if fills:
                assert max(fills) - min(fills) <= 1
        live = idx.live_pages(h)
        assert np.array_equal(idx.page_vals[h, idx.tok_page[h, :20000], idx.tok_slot[h, :20000]], V[h])
        assert set(live.tolist()) == set(range(idx.next_page[h]))
        assert idx.cnt_pages[h, 0] == len(live) and idx.cnt_desc[h, 0] == 20000


def test_t7_split_sizes_and_dirty_pages(rng):
    C = 16
    idx = PagedDCIIndex(1, 8, 4, IndexConfig(page_size=C, rebuild_growth=None))
    K = rng.standard_normal((1, C, 8)).astype(np.float32)
    idx.build(K, np.zeros((1, C, 4)))
    assert idx.live_pages(0).tolist() == [0] and idx.page_fill[0, 0] == C
    idx.dirty_pages(clear=True)
    assert all(d.size == 0 for d in idx.dirty_pages())
    idx.insert(rng.standard_normal((1, 1, 8)) * 0.5, np.ones((1, 1, 4)))
    fills = sorted(idx.page_fill[0, idx.live_pages(0)].tolist())
    assert fills == [C // 2, C // 2 + 1]
    assert set(idx.dirty_pages()[0].tolist()) == {0, 1}
    check_invariants(idx)
    # removing tokens until a page drops under C/2 merges the two pages back
    idx.delete(idx.page_tokens(0, [1])[0][:2])
    assert idx.live_pages(0).size == 1
    check_invariants(idx)


def _exact_check(idx, rng, n_q=3):
    for h in range(idx.H):
        Q = int_keys(rng, (n_q, idx.d))
        pages, _ = idx.query_rows(Q, np.full(n_q, h), 8, QueryParams(**EXHAUSTIVE))
        for r in range(n_q):
            assert pages[r].tolist()[: len(oracle_pages(idx, h, Q[r], 8))] == oracle_pages(idx, h, Q[r], 8)


def test_t8_insert_then_delete(rng):
    H, d = 2, 12
    A = int_keys(rng, (H, 3000, d))
    B = int_keys(rng, (H, 400, d), -2, 2)
    idx = PagedDCIIndex(H, d, config=IndexConfig(page_size=8, p0=0.02, rebuild_growth=None))
    idx.build(A)
    ids = idx.insert(B)
    check_invariants(idx, reference_keys=np.concatenate([A, B], axis=1))
    _exact_check(idx, rng)
    idx.delete(ids)
    check_invariants(idx)
    assert idx.stats()["tokens"] == 3000
    _exact_check(idx, rng)
    # deleting inner tokens (promotion and re-parenting)
    inner = np.flatnonzero(idx.tok_level[0, :3000] >= 1)[:25]
    idx.delete(inner)
    check_invariants(idx)
    _exact_check(idx, rng)


def test_cell_slots_are_recycled_through_deletes_and_grow_when_full(rng):
    """Only the root and tokens above level 0 keep cell numbers (a slot each, ``pagetable.cell_slot``). Deleting
    every token above level 0, round after round, promotes level-0 tokens into their places: they get slots,
    the deleted tokens' slots are reused, and the slot arrays do not grow. When they are full they grow, and
    the slots held keep their numbers."""
    H, d = 2, 8
    idx = PagedDCIIndex(H, d, config=IndexConfig(page_size=4, p0=0.03, rebuild_growth=None))
    idx.build(int_keys(rng, (H, 600, d)))
    cap = idx.cell_first.shape[1]
    for _ in range(6):
        live = np.flatnonzero(idx.alive[: idx.n_tokens])
        idx.delete(live[(idx.tok_level[:, live] >= 1).any(axis=0)][:40])
        check_invariants(idx)
        _exact_check(idx, rng)
    assert idx.cell_first.shape[1] == cap and idx.n_free_slots.sum() > 0
    # fill head 0's slots past their capacity (white-box: level-0 tokens given slots, then released again)
    before = {name: idx.cell_array(name, 0).copy() for name in ("cell_first", "cnt_desc", "cnt_pages", "cell_m")}
    lows = np.flatnonzero((idx.tok_level[0, : idx.n_tokens] == 0) & idx.alive[: idx.n_tokens])[: cap + 5]
    for t in lows:
        idx._give_slot(0, int(t))
    assert idx.cell_first.shape[1] > cap
    for t in lows:
        idx._release_slot(0, int(t))
    for name, arr in before.items():
        assert np.array_equal(idx.cell_array(name, 0), arr), name
    check_invariants(idx)
    _exact_check(idx, rng)


def test_the_checker_catches_a_leaked_or_twice_freed_cell_slot(rng):
    idx = PagedDCIIndex(1, 8, config=IndexConfig(page_size=4, p0=0.05, rebuild_growth=None))
    idx.build(int_keys(rng, (1, 400, 8)))
    live = idx.live_ids()
    idx.delete(live[idx.tok_level[0, live] >= 1][:5])
    check_invariants(idx)
    assert idx.n_free_slots[0] > 0
    leaked = idx.copy()
    leaked.n_free_slots[0] -= 1  # a released slot forgotten
    with pytest.raises(AssertionError, match="leaked"):
        check_invariants(leaked)
    twice = idx.copy()
    twice.free_slots[0, twice.n_free_slots[0]] = twice.free_slots[0, 0]  # a slot freed twice
    twice.n_free_slots[0] += 1
    twice.next_slot[0] += 1  # (the counts still add up)
    with pytest.raises(AssertionError, match="free cell slots repeat"):
        check_invariants(twice)


def test_inserts_after_deletes_emptied_level_one_rebuild_the_tree(rng):
    """Deleting every token on levels 0 and 1 left higher levels without children; the next insert put its
    tokens under the root beside them (a level-0 root child under a top level of 7: a broken tree, and a search
    reading a level-0 token's cell, which has none)."""
    idx = PagedDCIIndex(1, 8, config=IndexConfig(page_size=4, p0=0.2, p_up=0.5, rebuild_growth=None))
    idx.build(rng.standard_normal((1, 200, 8)).astype(np.float32))
    live = idx.live_ids()
    idx.delete(live[idx.tok_level[0, live] <= 1])
    check_invariants(idx)
    assert idx.level_counts[0, 1] == 0 and idx.top_level()[0] >= 2
    kept = idx.n_live
    new = idx.insert(rng.standard_normal((1, 30, 8)).astype(np.float32))
    check_invariants(idx)
    assert idx.rebuilds == 1 and new.size == 30 and idx.n_live == kept + 30 and idx.alive[new].all()
    _exact_check(idx, rng)


@pytest.mark.slow
def test_t8_thousand_random_operations(rng):
    H, d, C = 2, 8, 4
    cfg = IndexConfig(page_size=C, p0=0.08, p_up=0.3, rebuild_growth=3.0)
    idx = PagedDCIIndex(H, d, 2, cfg)
    K0 = int_keys(rng, (H, 150, d))
    idx.build(K0, K0[:, :, :2])
    M_build, rebuilds = idx.M.copy(), idx.rebuilds
    for op in range(1000):
        live = np.flatnonzero(idx.alive[: idx.n_tokens])
        kind = rng.choice(["insert", "insert", "delete", "query"]) if live.size > 20 else "insert"
        if kind == "insert":
            b = int(rng.integers(1, 12))
            hi = 5 if rng.random() < 0.03 else 3  # now and then a key beyond the max norm
            K = int_keys(rng, (H, b, d), -hi, hi)
            idx.insert(K, K[:, :, :2])
        elif kind == "delete":
            idx.delete(rng.choice(live, size=int(rng.integers(1, 6)), replace=False))
        else:
            _exact_check(idx, rng, n_q=1)
        if idx.rebuilds != rebuilds:
            M_build, rebuilds = idx.M.copy(), idx.rebuilds
        check_invariants(idx, exact_parents=np.array_equal(idx.M, M_build))
    assert idx.rebuilds >= 1
    live = np.flatnonzero(idx.alive[: idx.n_tokens])
    idx.delete(live)
    check_invariants(idx)
    assert idx.stats()["tokens"] == 0 and all(p == 0 for p in idx.stats()["pages"])
    assert idx.query(np.ones((2, d)), 4).max() == -1


def test_t9_max_norm_growth(rng):
    H, d = 2, 12
    A = int_keys(rng, (H, 2000, d))
    idx = PagedDCIIndex(H, d, config=IndexConfig(page_size=8, p0=0.02, rebuild_growth=None))
    idx.build(A)
    M0 = idx.M.copy()
    big = int_keys(rng, (H, 30, d), -6, 6)
    idx.insert(big)
    assert np.all(idx.M > M0)
    check_invariants(idx, exact_parents=False, reference_keys=np.concatenate([A, big], axis=1))
    _exact_check(idx, rng)
    # exact-mode answers equal a rebuild with the final M
    fresh = PagedDCIIndex(H, d, config=IndexConfig(page_size=8, p0=0.02))
    fresh.build(np.concatenate([A, big], axis=1))
    Q = int_keys(rng, (2 * H, d))
    for h in range(H):
        a, _ = idx.query_rows(Q, np.full(2 * H, h), 1, QueryParams(**EXHAUSTIVE))
        b, _ = fresh.query_rows(Q, np.full(2 * H, h), 1, QueryParams(**EXHAUSTIVE))
        for r in range(2 * H):  # the best page holds the best token in both layouts
            best = np.max(np.concatenate([A, big], axis=1)[h] @ Q[r])
            for x, p in ((idx, a[r, 0]), (fresh, b[r, 0])):
                toks = x.page_tokens(h, [p])[0]
                assert np.max(np.concatenate([A, big], axis=1)[h][toks] @ Q[r]) == best


def test_rebuild_policy_keeps_ids_and_marks_pages_dirty(rng):
    idx = PagedDCIIndex(1, 8, config=IndexConfig(page_size=8, p0=0.05, rebuild_growth=2.0))
    K = rng.standard_normal((1, 100, 8)).astype(np.float32)
    idx.build(K, positions=np.arange(1000, 1100))
    idx.dirty_pages()
    old_pages = int(idx.next_page[0])
    new_ids = idx.insert(rng.standard_normal((1, 150, 8)).astype(np.float32), positions=np.arange(5000, 5150))
    assert idx.rebuilds == 1 and new_ids.tolist() == list(range(100, 250))
    assert idx.positions[:100].tolist() == list(range(1000, 1100))
    assert idx.top_level()[0] >= 1
    assert set(range(old_pages)) <= set(idx.dirty_pages()[0].tolist())
    check_invariants(idx)


def test_capacity_grows_by_a_quarter_not_double(rng):
    """A decode step's insert past a build's capacity grew every array to twice its size (a whole prompt's
    index doubled by one token); now a build leaves 1/16 room and growth is by 1.25, and deletes that move
    children into other cells grow the page arrays first (a page split past the capacity would write
    outside them)."""
    n = 4096
    K = rng.standard_normal((2, n + 600, 16)).astype(np.float32)
    idx = PagedDCIIndex(2, 16, 0, IndexConfig(page_size=16, key_dtype="int8"))
    idx.build(K[:, :n])
    built = idx.nbytes()
    assert idx.alive.shape[0] <= n + n // 16 + 16
    assert idx.page_fill.shape[1] <= 1.1 * idx.next_page.max() + 16
    for i in range(n, n + 600):  # decode steps: one token at a time, past the build's room
        idx.insert(K[:, i: i + 1])
    assert idx.alive.shape[0] >= n + 600 and idx.nbytes() < 1.45 * built  # was 2x
    idx.delete(np.arange(0, n, 3))
    check_invariants(idx)
    assert (idx.next_page <= idx.page_fill.shape[1]).all()


def test_decode_inserts_keep_pages_full(rng):
    """A full page passes a token to a neighbouring page of its cell with room before it splits: a decode's
    single-token inserts into the bisect layout's nearly full pages (2048 tokens, 400 inserts) took 0.235 new
    pages per insert (mean fill 10.4 of 16) when every insert into a full page split it; now 0.13 (12.6)."""
    r = np.random.default_rng(0)
    K = r.standard_normal((1, 2448, 32)).astype(np.float32)
    idx = PagedDCIIndex(1, 32, 0, IndexConfig(page_size=16, rebuild_growth=None))
    idx.build(K[:, :2048])
    before = int(idx.next_page[0] - idx.free_n[0])
    for i in range(2048, 2448):
        idx.insert(K[:, i: i + 1])
    check_invariants(idx, reference_keys=K)
    used = int(idx.next_page[0] - idx.free_n[0])
    assert (used - before) / 400 < 0.18 and 2448 / used > 11.5


@pytest.mark.parametrize("layout", ["bisect", "projection"])
def test_projections_stay_exact_through_many_lifts_of_one_cell(rng, layout):
    """A key set along one direction with each insert's norm a little larger lifts the same cell every time
    (M grows). Each lift recomputes the children's projections from their keys: adding each lift's change to
    the stored float32 value let the roundings add up (2e-6 sqrt(M) off after 3000 lifts, a helper's review;
    past the checker's 1e-7 sqrt(M) within a few hundred)."""
    d = 64
    idx = PagedDCIIndex(1, d, config=IndexConfig(page_size=16, rebuild_growth=None, layout=layout, key_dtype="float32"))
    idx.build(rng.standard_normal((1, 60, d)).astype(np.float32))
    v = rng.standard_normal(d)
    v /= np.linalg.norm(v)
    base = float(np.sqrt(idx.M[0]))
    m0 = idx.M[0]
    for i in range(400):
        k = v * base * (1 + 1e-5 * (i + 1)) + 1e-4 * rng.standard_normal(d)
        idx.insert(k.astype(np.float32)[None, None])
    assert idx.M[0] > m0
    check_invariants(idx, exact_parents=False)
