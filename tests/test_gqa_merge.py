"""The GQA merges (index/gqa_merge.py): against a plain NumPy statement of each rule, through the exact scan
and through the page-ranking policies."""

from __future__ import annotations

import numpy as np
import pytest

from icecache_sglang.index import IndexConfig, PagedDCIIndex
from icecache_sglang.index.gqa_merge import merge_by_mass, merge_rows, merge_scores, ranked_rows
from icecache_sglang.index.paged_index import query_batch
from icecache_sglang.index.scan import page_maxima, scan_pages
from icecache_sglang.index.search import merge_group_pages
from icecache_sglang.index.selection import OraclePagePolicy, OraclePositionalPolicy, QuestPolicy


def mass_reference(best: np.ndarray, g: int, P: int, scale: float) -> np.ndarray:
    """Every head's best page first, then by the sum over heads of softmax(scale * scores); ties: lower page."""
    H, n = best.shape[0] // g, best.shape[1]
    out = np.full((H, P), -1, np.int32)
    for h in range(H):
        w, first = np.zeros(n), set()
        for row in best[h * g : (h + 1) * g]:
            valid = row > -np.inf
            if not valid.any():
                continue
            first.add(int(np.argmax(row)))
            e = np.where(valid, np.exp((row - row.max()) * scale), 0.0)
            w += e / e.sum()
        cands = [p for p in range(n) if w[p] > 0 or p in first]
        order = sorted(cands, key=lambda p: (p not in first, -w[p], p))[:P]
        out[h, : len(order)] = order
    return out


@pytest.mark.parametrize("seed", range(5))
def test_mass_merge_matches_reference(seed):
    rng = np.random.default_rng(seed)
    g, H, n = [(1, 3, 40), (3, 2, 57), (7, 2, 200), (4, 8, 33), (2, 1, 5)][seed]
    best = rng.standard_normal((H * g, n)) * 8
    best[rng.random(best.shape) < 0.2] = -np.inf  # pages a head does not have
    if seed == 4:
        best[0] = -np.inf  # a head with no page at all
    for P in (1, 3, 12, n + 4):
        got = merge_by_mass(best, g, P, 1 / np.sqrt(128))
        np.testing.assert_array_equal(got, mass_reference(best, g, P, 1 / np.sqrt(128)))


def test_mass_merge_keeps_every_heads_best_page_and_weighs_shared_pages():
    # two query heads, P = 3: each has its own best page (0 and 3); head 0's second best (page 1) is close
    # behind for head 0 alone, page 2 is close behind for both
    s = np.array([[10.0, 9.0, 8.9, 0, 0, 0],
                  [0, -5.0, 9.5, 10.0, 0, 0]])
    rank = merge_scores(s, 2, 3, "rank", 1.0)[0]
    mass = merge_scores(s, 2, 3, "mass", 1.0)[0]
    assert list(rank) == [0, 3, 1]  # rank-major: head 0's second choice takes the third page
    assert list(mass) == [3, 0, 2]  # the decisive pages (heaviest first), then the page the group weighs most
    one = merge_scores(s, 2, 1, "mass", 1.0)[0]
    assert list(one) == [3]  # more best pages than the budget: the heaviest


def test_rank_merge_equals_merge_group_pages():
    rng = np.random.default_rng(7)
    best = rng.standard_normal((12, 30))
    best[:, 25:] = -np.inf
    rows = ranked_rows(best)
    assert (rows[:, 25:] == -1).all()
    np.testing.assert_array_equal(merge_scores(best, 4, 6, "rank", 1.0), merge_group_pages(rows, 4, 6))
    with pytest.raises(ValueError, match="gqa_merge"):
        merge_scores(best, 4, 6, "sum", 1.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scan_mass_merge_equals_merge_of_exact_page_scores(dtype):
    rng = np.random.default_rng(3)
    H, g, d, n = 2, 4, 32, 700
    K = rng.standard_normal((H, n, d)).astype(np.float32)
    idx = PagedDCIIndex(H, d, 0, IndexConfig(page_size=16, key_dtype=dtype))
    idx.build(K)
    Q = rng.standard_normal((H * g, d)).astype(np.float32)
    flat = idx.page_keys.reshape(H, idx.page_keys.shape[1], -1)
    best = page_maxima(flat, idx.page_fill, idx.next_page, Q, 32)
    for P in (3, 10):
        got = scan_pages(idx.page_keys, idx.page_fill, idx.next_page, Q, P, merge="mass")
        np.testing.assert_array_equal(got, mass_reference(best.astype(np.float64), g, P, 1 / np.sqrt(d)))
        assert (got >= 0).all() and all(len(set(r)) == P for r in got)
        rank = scan_pages(idx.page_keys, idx.page_fill, idx.next_page, Q, P)
        # both keep every query head's exact best page when P covers them
        for h in range(H):
            bests = set(best[h * g : (h + 1) * g].argmax(axis=1))
            if len(bests) <= P:
                assert bests <= set(got[h]) and bests <= set(rank[h])


@pytest.mark.parametrize("cls", [OraclePagePolicy, OraclePositionalPolicy, QuestPolicy])
def test_policies_follow_their_merge(cls):
    rng = np.random.default_rng(11)
    H, g, d, n = 2, 7, 32, 900
    K = rng.standard_normal((H, n, d)).astype(np.float32)
    pol = cls(page_size=16)
    pol.build(K)
    differs = 0
    for s in range(6):
        Q = (rng.standard_normal((H * g, d)) * 3).astype(np.float32)
        rank = pol.select(Q, 128)
        pol.set_merge("mass")
        mass = pol.select(Q, 128)
        pol.set_merge("rank")
        for r, m in zip(rank, mass):
            assert len(m) <= 128 and len(np.unique(m)) == len(m)
            differs += not np.array_equal(r, m)
    assert differs > 0  # seven query heads over 8 pages: the merges choose differently
    with pytest.raises(ValueError, match="gqa_merge"):
        pol.set_merge("max")


@pytest.mark.parametrize("seed", range(3))
def test_row_merge_equals_dense_merge_over_the_rows_pages(seed):
    """The search's merge (each row's best R pages and scores) is the dense merge over those pages alone."""
    rng = np.random.default_rng(seed)
    g, H, n, R = [(4, 2, 80, 6), (7, 2, 300, 12), (1, 3, 20, 25)][seed]
    best = rng.standard_normal((H * g, n)) * 5
    rows = ranked_rows(best)[:, :R]
    scores = np.take_along_axis(best, np.maximum(rows, 0), axis=1)
    scores[rows < 0] = np.nan  # padding must not matter
    masked = np.full_like(best, -np.inf)
    np.put_along_axis(masked, np.maximum(rows, 0), np.where(rows >= 0, scores, -np.inf), axis=1)
    for P in (1, 4, R + 3):
        np.testing.assert_array_equal(merge_rows(rows, scores, g, P, "mass", 0.3),
                                      merge_by_mass(masked, g, P, 0.3))
        np.testing.assert_array_equal(merge_rows(rows, scores, g, P, "rank", 0.3), merge_group_pages(rows, g, P))


def test_index_query_merges_its_rows():
    rng = np.random.default_rng(5)
    H, g, d = 2, 4, 32
    idx = PagedDCIIndex(H, d, 0, IndexConfig(page_size=16))
    idx.build(rng.standard_normal((H, 2000, d)).astype(np.float32))
    Q = rng.standard_normal((H * g, d)).astype(np.float32)
    rows, scores = idx.query_rows(Q, np.repeat(np.arange(H), g), 8)
    np.testing.assert_array_equal(idx.query(Q, 8, merge="mass"), merge_rows(rows, scores, g, 8, "mass", d ** -0.5))
    np.testing.assert_array_equal(idx.query(Q, 8), merge_group_pages(rows, g, 8))
    np.testing.assert_array_equal(query_batch([idx, idx], np.stack([Q, Q]), 8, merge="mass")[1],
                                  idx.query(Q, 8, merge="mass"))
