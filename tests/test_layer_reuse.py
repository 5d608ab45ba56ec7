"""T13: non-anchor layers share the anchor's (page, slot) map and selected pages, with their own K/V."""

import numpy as np
import pytest

from icecache_sglang.index.layer_reuse import FollowerLayer, anchor_layer
from icecache_sglang.index.paged_index import PagedDCIIndex


def test_anchor_schedule():
    got = [anchor_layer(layer, 2, 3) for layer in range(9)]
    assert got == [None, None, 2, 2, 2, 5, 5, 5, 8]
    assert [anchor_layer(layer, 0, 1) for layer in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError):
        anchor_layer(3, 2, 0)


def test_t13_follower_pages_hold_own_kv_in_anchor_layout(rng):
    H, n, d = 2, 3000, 16
    K = rng.standard_normal((H, n, d)).astype(np.float32)
    V = rng.standard_normal((H, n, 8)).astype(np.float32)
    anchor = PagedDCIIndex(H, d, 8)
    anchor.build(K, V)
    K2 = rng.standard_normal((H, n, d)).astype(np.float32)
    V2 = rng.standard_normal((H, n, 8)).astype(np.float32)
    follower = FollowerLayer(anchor)
    follower.write(K2, V2)
    more = rng.standard_normal((H, 20, d)).astype(np.float32)
    anchor.insert(more, more[:, :, :8])
    follower.write(more * 2, more[:, :, :8] * 2)
    pages = anchor.query(rng.standard_normal((4, d)).astype(np.float32), 6)
    allK2 = np.concatenate([K2, more * 2], axis=1)
    for h in range(H):
        fk, fv, fill = follower.page_kv(h, pages[h])
        for i, p in enumerate(pages[h]):
            toks = anchor.page_tok[h, p, : fill[i]]
            assert np.array_equal(fk[i, : fill[i]], allK2[h, toks])
            assert np.all(fk[i, fill[i]:] == 0)
    with pytest.raises(ValueError):
        follower.write(K2[:, :5], V2[:, :5])
