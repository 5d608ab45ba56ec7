"""The bisect page layout (index/layout.py): pages are the leaves of a balanced bisection of each cell's keys,
and a token that joins a cell later lands in its nearest child's page."""

from __future__ import annotations

import numpy as np
import pytest

from icecache_sglang.index import IndexConfig, PagedDCIIndex
from icecache_sglang.index.layout import bisect_order


def _runs(m: int, C: int) -> list[int]:
    npg, out, i = -(-m // C), [], 0
    for g in range(npg):
        out.append((m - i) // (npg - g))
        i += out[-1]
    return out


def test_bisect_order_puts_each_cluster_in_its_own_page(rng):
    C, k, d = 16, 8, 24
    centres = rng.standard_normal((k, d)) * 20
    X = np.concatenate([c + rng.standard_normal((C, d)) * 0.1 for c in centres]).astype(np.float32)
    perm = rng.permutation(len(X))
    order = bisect_order(X[perm], C)
    assert sorted(order) == list(range(len(X)))
    label = (perm // C)[order]
    for i in range(k):  # balanced runs of 16 of the order: one cluster each
        assert len(set(label[i * C: (i + 1) * C])) == 1


@pytest.mark.parametrize("m", [1, 16, 17, 100, 255, 1000])
def test_bisect_leaves_are_the_balanced_pages(rng, m):
    """Every run of layout_sorted's balanced cut is one part of the recursion: its keys are closer to each
    other than a random run of the same size."""
    C, d = 16, 8
    X = rng.standard_normal((m, d)).astype(np.float32)
    order = bisect_order(X, C)
    assert sorted(order) == list(range(m))
    spread = []
    i = 0
    for size in _runs(m, C):
        run = X[order[i: i + size]]
        spread.append(((run - run.mean(axis=0)) ** 2).sum(axis=1).mean())
        i += size
    if m > 2 * C:
        assert np.mean(spread) < 0.8 * ((X - X.mean(axis=0)) ** 2).sum(axis=1).mean()


def test_a_later_token_joins_its_nearest_childs_page(rng):
    H, d, C = 2, 16, 16
    K = rng.standard_normal((H, 3000, d)).astype(np.float32)
    idx = PagedDCIIndex(H, d, 0, IndexConfig(page_size=C, rebuild_growth=None))
    assert idx.cfg.layout == "bisect"
    idx.build(K)
    twins = rng.choice(3000, 40, replace=False)
    new = idx.insert(K[:, twins] + 1e-4 * rng.standard_normal((H, 40, d)).astype(np.float32))
    idx.check_invariants()
    for h in range(H):
        same_cell = idx.tok_parent[h, new] == idx.tok_parent[h, twins]
        assert same_cell.mean() > 0.9  # the twin's nearest level-1 token is almost always the original's parent
        joined = idx.tok_page[h, new][same_cell] == idx.tok_page[h, twins][same_cell]
        split = idx.page_cell[h, idx.tok_page[h, new][same_cell]] == idx.page_cell[h, idx.tok_page[h, twins][same_cell]]
        assert split.all()
        # in the twin's page, or in the half a full page split off (both halves are runs of one leaf)
        assert joined.mean() > 0.7, joined.mean()


def test_projection_layout_is_the_specs(rng):
    idx = PagedDCIIndex(1, 8, 0, IndexConfig(page_size=8, layout="projection"))
    idx.build(rng.standard_normal((1, 500, 8)).astype(np.float32))
    idx.check_invariants()
    live = idx.live_ids()
    np.testing.assert_array_equal(idx.tok_pkey[0, live], idx.tok_proj[0, live])
    with pytest.raises(ValueError, match="layout must be one of"):
        IndexConfig(layout="kmeans")


def test_cell_orders_are_lexsorts_by_cell_projection_and_token(rng):
    """A build's per-head order (every head at once, ``_cell_orders``) equals ``np.lexsort((tids, proj,
    cells))``: ties in projection (many here) go to the lower token, cells in ascending order, the root
    (parent -1) first."""
    from icecache_sglang.index.paged_index import _cell_orders

    H, n, n_ids = 3, 5000, 5400
    tids = np.sort(rng.choice(n_ids, n, replace=False))
    parent = rng.choice(np.concatenate([[-1], tids[::50]]), (H, n))
    parent[1, ::2] = -1  # a cell of 2500 (sorted by mergesort, not insertion)
    proj = rng.integers(-20, 20, (H, n)).astype(np.float64) / 4  # ties
    orders, cells_sorted = _cell_orders(parent, proj, n_ids)
    for h in range(H):
        want = np.lexsort((tids, proj[h], parent[h] + 1))
        assert (orders[h] == want).all() and (cells_sorted[h] == parent[h][want] + 1).all()


@pytest.mark.parametrize("m", [1, 2, 37, 256, 257, 3000])
def test_split_sort_is_a_stable_argsort(rng, m):
    """The bisection's in-place sort (insertion up to INSERTION_SORT_MAX, mergesort above) orders a part as
    ``np.argsort(kind="mergesort")`` does, ties in their current order."""
    from icecache_sglang.index.layout import INSERTION_SORT_MAX, sort_by

    assert 37 < INSERTION_SORT_MAX < 257 < 3000
    proj = rng.integers(-5, 6, size=m).astype(np.float64)  # many ties
    ids = rng.permutation(m + 10).astype(np.int64)
    a = 4
    want = ids.copy()
    want[a:a + m] = ids[a:a + m][np.argsort(proj, kind="mergesort")]
    got_ids, got_proj = ids.copy(), proj.copy()
    sort_by(got_proj, got_ids, a, m, np.empty(m, np.int64))
    assert np.array_equal(got_ids, want)


def test_bisect_order_is_the_same_for_rows_anywhere(rng):
    """A cell's children lie anywhere in the prompt: the order of rows read through ids is the order of the
    same rows side by side."""
    from icecache_sglang.index.layout import bisect_cells

    X = rng.standard_normal((2000, 24)).astype(np.float32)
    ids = rng.permutation(2000)[:700].astype(np.int32)  # as the build's orders
    order = ids.copy()
    bisect_cells(order, np.zeros(700, np.int32), X, 16)
    assert np.array_equal(order, ids[bisect_order(X[ids], 16)])
