"""The store-order exhaustive scan (``index/scan_store.py``) returns exactly ``scan_pages``'s pages."""

from __future__ import annotations

import numpy as np
import pytest

from icecache_sglang.index.config import IndexConfig
from icecache_sglang.index.keys import to_storage
from icecache_sglang.index.paged_index import PagedDCIIndex
from icecache_sglang.index.scan import scan_pages
from icecache_sglang.index.scan_store import scan_index_store
from icecache_sglang.index.synthetic import lowrank_keys


@pytest.mark.parametrize("key_dtype", ["float32", "bfloat16"])
def test_store_scan_equals_the_page_scan(key_dtype):
    rng = np.random.default_rng(5)
    H, g, d, n = 3, 4, 32, 2000
    K, Qs = lowrank_keys(rng, n + 64, d, rank=8, n_queries=4, heads=H, group=g)
    idx = PagedDCIIndex(H, d, config=IndexConfig(page_size=8, rebuild_growth=None, key_dtype=key_dtype))
    slots = rng.permutation(np.arange(5, 5 + n + 64))  # the store rows of the tokens, in any order
    idx.build(K[:, :n], positions=slots[:n])
    idx.insert(K[:, n:n + 64], positions=slots[n:n + 64])
    idx.delete(np.arange(100, 140))  # dead tokens are skipped
    store = np.zeros((slots.max() + 1, H, d), np.float32)
    store[slots] = K.transpose(1, 0, 2)
    if key_dtype == "bfloat16":
        store = to_storage(store.reshape(-1, d), "bfloat16").reshape(store.shape)
    for q in Qs:
        want = scan_pages(idx.page_keys, idx.page_fill, idx.next_page, q, 12)
        got = scan_index_store(idx, store, q, 12)
        assert np.array_equal(got, want)
