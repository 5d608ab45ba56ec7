"""bfloat16 key storage: half the bytes, and exactly a float32 index over the rounded keys."""

import numpy as np
import pytest
import torch

from icecache_sglang.index.config import IndexConfig
from icecache_sglang.index.invariants import check_invariants
from icecache_sglang.index.keys import from_storage, round_keys, to_storage
from icecache_sglang.index.paged_index import PagedDCIIndex, query_batch
from icecache_sglang.index.scan import scan_pages

STATE = ("tok_level", "tok_parent", "tok_page", "tok_slot", "tok_proj", "tok_sqn", "page_tok", "page_fill",
         "page_cell", "page_next", "cnt_pages", "cnt_desc")


def test_rounding_is_torchs_bfloat16(rng):
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 50,
                        np.array([0.0, -0.0, 1e-40, 3.4e38, -3.4e38, np.inf, -np.inf], np.float32)])
    ours = to_storage(x, "bfloat16")
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(from_storage(ours), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isnan(from_storage(to_storage(np.array([np.nan], np.float32), "bfloat16"))).all()
    assert to_storage(x, "float32") is not None and np.array_equal(to_storage(x, "float32"), x)


def _pair(rng, H=3, n=3000, d=32):
    K = rng.standard_normal((H, n, d)).astype(np.float32) * 3
    bf = PagedDCIIndex(H, d, config=IndexConfig(key_dtype="bfloat16", rebuild_growth=None))
    f32 = PagedDCIIndex(H, d, config=IndexConfig(key_dtype="float32", rebuild_growth=None))
    bf.build(K)
    f32.build(round_keys(K, "bfloat16"))
    bf.check_invariants()
    return K, bf, f32


def _same(a: PagedDCIIndex, b: PagedDCIIndex) -> None:
    for f in STATE:
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert a.page_keys.dtype == np.uint16 and b.page_keys.dtype == np.float32
    assert np.array_equal(from_storage(a.page_keys), b.page_keys)


def test_bf16_index_is_a_float32_index_over_the_rounded_keys(rng):
    K, bf, f32 = _pair(rng)
    _same(bf, f32)
    Q = rng.standard_normal((9, 32)).astype(np.float32)
    assert np.array_equal(bf.query(Q, 12), f32.query(Q, 12))
    assert np.array_equal(query_batch([bf, bf.copy()], np.stack([Q, Q]), 12),
                          query_batch([f32, f32.copy()], np.stack([Q, Q]), 12))
    # decode-time inserts (raising the max norm: cells re-lifted), deletes (children re-homed): still equal
    extra = rng.standard_normal((3, 40, 32)).astype(np.float32) * 6
    assert np.array_equal(bf.insert(extra), f32.insert(round_keys(extra, "bfloat16")))
    gone = bf.live_ids()[::97]
    bf.delete(gone)
    f32.delete(gone)
    _same(bf, f32)
    assert np.array_equal(bf.query(Q, 12), f32.query(Q, 12))
    check_invariants(bf, exact_parents=False)  # a larger max norm moves D_kk argmins; parents stay (spec)
    assert np.array_equal(bf.keys_of(bf.live_ids()), f32.keys_of(f32.live_ids()))


def test_bf16_halves_the_key_rows_and_the_scan_reads_them(rng):
    K, bf, f32 = _pair(rng, H=2, n=4000, d=64)
    assert bf.page_keys.nbytes * 2 == f32.page_keys.nbytes
    assert bf.nbytes() < f32.nbytes() - f32.page_keys.nbytes // 3
    Q = rng.standard_normal((8, 64)).astype(np.float32)
    assert np.array_equal(scan_pages(bf.page_keys, bf.page_fill, bf.next_page, Q, 10),
                          scan_pages(f32.page_keys, f32.page_fill, f32.next_page, Q, 10))


def test_key_dtype_is_validated():
    with pytest.raises(ValueError, match="key_dtype must be"):
        IndexConfig(key_dtype="float16")
    assert IndexConfig().storage_dtype == "float32"
