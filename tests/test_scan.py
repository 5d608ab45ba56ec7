"""The exhaustive page scan (``icecache_sglang.index.scan``) against a plain NumPy computation: every valid
token's score, each page's max, the top pages per query head (score descending, ties by lower page id),
the GQA merge; float32 keys and bf16 bits (uint16); free pages and stale slots never read."""

import numpy as np
import pytest
from conftest import EXHAUSTIVE, int_keys

from icecache_sglang.index.config import IndexConfig, QueryParams
from icecache_sglang.index.keys import from_storage, to_storage
from icecache_sglang.index.paged_index import PagedDCIIndex
from icecache_sglang.index.scan import page_maxima, read_keys, scan_pages, scan_rows, score_pages
from icecache_sglang.index.synthetic import lowrank_keys


def bf16_bits(page_keys: np.ndarray) -> np.ndarray:
    return (page_keys.view(np.uint32) >> 16).astype(np.uint16)


def ref_rows(page_keys, page_fill, next_page, Q, n_pages):
    """Plain NumPy: float64 scores of every valid token, max per page, top pages per query head."""
    K = from_storage(page_keys).astype(np.float64)
    H = K.shape[0]
    g = Q.shape[0] // H
    rows = np.full((Q.shape[0], n_pages), -1, np.int32)
    for h in range(H):
        pages = np.flatnonzero(page_fill[h, : next_page[h]] > 0)
        for r in range(g):
            q = Q[h * g + r].astype(np.float64)
            best = np.array([(K[h, p, : page_fill[h, p]] @ q).max() for p in pages])
            top = pages[np.lexsort((pages, -best))][:n_pages]  # score descending, then page id
            rows[h * g + r, : top.size] = top
    return rows


def ref_merge(rows, g, n_pages):
    """Per KV head: its rows' pages rank by rank (row order within a rank), first n_pages unique."""
    out = np.full((rows.shape[0] // g, n_pages), -1, np.int32)
    for h in range(out.shape[0]):
        seen = []
        for rank in range(rows.shape[1]):
            for r in range(g):
                p = int(rows[h * g + r, rank])
                if p >= 0 and p not in seen and len(seen) < n_pages:
                    seen.append(p)
        out[h, : len(seen)] = seen
    return out


def built_index(rng, H, n, d, g, n_queries=3, C=16):
    K, Qs = lowrank_keys(rng, n + 40, d, rank=8, n_queries=n_queries, heads=H, group=g)
    idx = PagedDCIIndex(H, d, config=IndexConfig(page_size=C, rebuild_growth=None))
    idx.build(K[:, :n])
    idx.insert(K[:, n:])  # partly filled pages
    return idx, Qs


def arrays(idx, dtype):
    pk = idx.page_keys if dtype == "float32" else bf16_bits(np.ascontiguousarray(idx.page_keys, np.float32))
    return np.ascontiguousarray(pk), idx.page_fill.copy(), idx.next_page.copy()


def check(pk, fill, nxt, Q, n_pages):
    g = Q.shape[0] // pk.shape[0]
    want_rows = ref_rows(pk, fill, nxt, Q, n_pages)
    got_rows = scan_rows(pk, fill, nxt, Q, n_pages)
    assert got_rows.dtype == np.int32 and got_rows.shape == (Q.shape[0], n_pages)
    np.testing.assert_array_equal(got_rows, want_rows)
    got = scan_pages(pk, fill, nxt, Q, n_pages)
    assert got.dtype == np.int32 and got.shape == (pk.shape[0], n_pages)
    np.testing.assert_array_equal(got, ref_merge(want_rows, g, n_pages))
    return got


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
@pytest.mark.parametrize("H,g,d", [(1, 4, 128), (8, 4, 64), (2, 6, 32), (3, 1, 16), (3, 3, 64), (2, 7, 32)])
def test_scan_equals_numpy(rng, dtype, H, g, d):
    idx, Qs = built_index(rng, H, 1500, d, g)
    pk, fill, nxt = arrays(idx, dtype)
    assert pk.dtype == (np.float32 if dtype == "float32" else np.uint16)
    assert (fill[:, : nxt.max()] < idx.C).any()  # some pages are partly filled
    for Q in Qs:
        for n_pages in (1, 12):
            check(pk, fill, nxt, Q, n_pages)


def test_scan_equals_exhaustive_index_query(rng):
    """On continuous keys (no tied page scores) the scan is the index's exhaustive answer."""
    idx, Qs = built_index(rng, 2, 2500, 32, 4)
    idx.delete(np.arange(0, 2500, 5))  # pages emptied and freed
    for Q in Qs:
        want = idx.query(Q, 12, QueryParams(**EXHAUSTIVE))
        np.testing.assert_array_equal(scan_pages(idx.page_keys, idx.page_fill, idx.next_page, Q, 12), want)


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_ties_go_to_the_lower_page_id(rng, dtype):
    """Small-integer keys: every score is exact whatever the summation order, and many pages tie."""
    H, g, d = 2, 4, 16
    idx = PagedDCIIndex(H, d, config=IndexConfig(page_size=8, rebuild_growth=None))
    idx.build(int_keys(rng, (H, 1200, d), -1, 1))
    pk, fill, nxt = arrays(idx, dtype)
    Q = int_keys(rng, (H * g, d), -1, 1)
    rows = scan_rows(pk, fill, nxt, Q, 12)
    K = from_storage(pk).astype(np.float64)
    best = [[K[h, p, : fill[h, p]] @ Q[h * g : (h + 1) * g].T for p in range(nxt[h])] for h in range(H)]
    n_tied = 0
    for row in range(H * g):
        h, r = divmod(row, g)
        s = [best[h][p][:, r].max() for p in rows[row]]
        assert all(a > b or (a == b and pa < pb) for a, b, pa, pb in zip(s, s[1:], rows[row], rows[row][1:]))
        n_tied += sum(a == b for a, b in zip(s, s[1:]))
    assert n_tied > 10  # the data do exercise the tie rule
    check(pk, fill, nxt, Q, 12)


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_a_copied_page_ties_and_the_lower_id_wins(rng, dtype):
    idx, Qs = built_index(rng, 2, 1500, 32, 4)
    pk, fill, nxt = arrays(idx, dtype)
    Q = Qs[0]
    top = int(scan_rows(pk, fill, nxt, Q, 12)[0, 0])
    other = 0 if top > 0 else int(nxt[0]) - 1
    pk[0, other], fill[0, other] = pk[0, top], fill[0, top]
    got = scan_rows(pk, fill, nxt, Q, 12)
    assert list(got[0, :2]) == sorted([other, top])
    check(pk, fill, nxt, Q, 12)


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_free_pages_and_stale_slots_are_never_read(rng, dtype):
    idx, Qs = built_index(rng, 2, 1200, 32, 4)
    pk, fill, nxt = arrays(idx, dtype)
    Q = Qs[0]
    before = scan_pages(pk, fill, nxt, Q, 12)
    # free the best pages of head 0 (fill 0, keys left in place); fill every stale slot, and the pages past
    # next_page, with keys of +-100 aligned with a query head of the KV head
    freed = before[0, :3]
    fill[0, freed] = 0
    for h in range(pk.shape[0]):
        val = (100 * np.sign(Q[h * 4])).astype(np.float32)
        val = val if dtype == "float32" else bf16_bits(val)
        for p in range(nxt[h]):
            pk[h, p, fill[h, p] :] = val
        pk[h, nxt[h] :] = val
        fill[h, nxt[h] :] = idx.C
    got = check(pk, fill, nxt, Q, 12)
    assert not np.isin(freed, got[0]).any()
    np.testing.assert_array_equal(got[1], before[1])
    assert (got >= 0).all()


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_more_pages_asked_than_in_use(rng, dtype):
    """Like the index: every page holding tokens, best first, then -1 padding (rows and merge)."""
    idx, Qs = built_index(rng, 2, 30, 16, 4)  # 70 tokens: a handful of pages per head
    pk, fill, nxt = arrays(idx, dtype)
    fill[1, 0] = 0  # and one free page
    n_valid = (fill[:, : nxt.max()] > 0).sum(1)
    got = check(pk, fill, nxt, Qs[0], 40)
    for h in range(2):
        assert sorted(got[h, : n_valid[h]]) == list(np.flatnonzero(fill[h, : nxt[h]] > 0))
        assert (got[h, n_valid[h] :] == -1).all()
    if dtype == "float32":
        want = idx.query(Qs[0], 40, QueryParams(**EXHAUSTIVE))
        np.testing.assert_array_equal(scan_pages(idx.page_keys, idx.page_fill, idx.next_page, Qs[0], 40), want)
    # a head with no pages in use: all -1
    nxt2 = nxt.copy()
    nxt2[0] = 0
    got = check(pk, fill, nxt2, Qs[0], 5)
    assert (got[0] == -1).all()


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunking_does_not_change_the_answer(rng, chunk):
    idx, Qs = built_index(rng, 1, 2000, 32, 4)
    pk, fill, nxt = arrays(idx, "float32")
    want = scan_pages(pk, fill, nxt, Qs[0], 12)
    np.testing.assert_array_equal(scan_pages(pk, fill, nxt, Qs[0], 12, chunk=chunk), want)
    assert read_keys(pk, nxt, fill, chunk=chunk) == pytest.approx(read_keys(pk, nxt, fill), rel=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_read_keys_sums_the_keys_in_use(rng, dtype):
    idx, _ = built_index(rng, 3, 1000, 32, 1)
    pk, fill, nxt = arrays(idx, dtype)
    K = from_storage(pk).astype(np.float64)
    valid = sum(K[h, p, : fill[h, p]].sum() for h in range(3) for p in range(nxt[h]))
    every = sum(K[h, : nxt[h]].sum() for h in range(3))
    scale = np.abs(K).sum()
    assert abs(read_keys(pk, nxt, fill) - valid) < 1e-5 * scale
    assert abs(read_keys(pk, nxt) - every) < 1e-5 * scale


@pytest.mark.parametrize("H,g,d", [(2, 4, 64), (2, 6, 32), (3, 1, 16), (3, 3, 64), (2, 7, 32)])
def test_int8_rows_are_scored_with_their_own_scales(rng, H, g, d):
    """Over int8 rows (``d`` values, then the row's 4-byte scale), every page's best score per query row, from
    the scan over all pages and from the candidate scoring over chosen columns, equals NumPy's over the
    dequantized rows (groups of 4, remainders and single rows; partly filled pages; free pages never scored);
    ``read_keys`` reads the rows' values before their scales."""
    idx, _ = built_index(rng, H, 700, d, g)
    pk = to_storage(idx.page_keys, "int8")  # [H, pages, C, d + 4], each row over its own scale
    fill, nxt = idx.page_fill.copy(), idx.next_page.copy()
    fill[0, 1] = 0  # a free page
    Q = rng.standard_normal((H * g, d)).astype(np.float32)
    K = from_storage(pk).astype(np.float64)
    want = np.full((H * g, int(nxt.max())), -np.inf)
    for h in range(H):
        for p in range(nxt[h]):
            if fill[h, p] > 0:
                want[h * g:(h + 1) * g, p] = (K[h, p, : fill[h, p]] @ Q[h * g:(h + 1) * g].T.astype(np.float64)).max(0)
    flat = pk.reshape(H, pk.shape[1], -1)
    got = page_maxima(flat, fill, nxt, Q, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    cols = np.full((H, 5), -1, np.int32)
    cols[:, :4] = [2, 0, 1, 7]
    best = np.full((H * g, 5), -np.inf, np.float32)
    score_pages(best, cols, flat, fill, Q)
    np.testing.assert_allclose(best[:, :4], want[:, [2, 0, 1, 7]], rtol=1e-5, atol=1e-4)
    assert np.isneginf(best[:, 4]).all()
    values = sum(pk[h, p, : fill[h, p], :d].astype(np.float64).sum() for h in range(H) for p in range(nxt[h]))
    assert read_keys(pk, nxt, fill) == pytest.approx(values, rel=1e-5)


def test_bad_arguments(rng):
    idx, Qs = built_index(rng, 2, 100, 16, 2)
    pk, fill, nxt = arrays(idx, "float32")
    with pytest.raises(ValueError):
        scan_pages(pk.astype(np.float64), fill, nxt, Qs[0], 4)
    with pytest.raises(ValueError):
        scan_pages(pk, fill, nxt, Qs[0][:3], 4)  # not a multiple of H_kv rows
    with pytest.raises(ValueError):
        scan_pages(pk, fill, nxt, Qs[0], 0)
    with pytest.raises(ValueError):
        scan_pages(pk, fill[:1], nxt, Qs[0], 4)
