"""The exact scan of many small indexes in one numba call (``index/scan_batch.py``) against ``select_baseline``
one sequence at a time (``scan_index`` + ``page_positions``): the same pages and slots for int8 indexes rescored
from a bfloat16 key store, bfloat16 and float32 indexes, both GQA merges, indexes grown by inserts, with deleted
tokens and copy-on-write copies, and a ``StateList`` that follows replaced arrays; and through the indexer's query
path, a batch of small and long sequences answered as one ``select_baseline`` per sequence would."""

import numpy as np
import pytest

from icecache_sglang.index.config import IndexConfig
from icecache_sglang.index.keys import to_storage
from icecache_sglang.index.paged_index import PagedDCIIndex, StateList
from icecache_sglang.index.scan_batch import scan_index_batch
from icecache_sglang.index.synthetic import lowrank_keys
from icecache_sglang.indexer.baselines import select_baseline

ROW = 900  # store rows per sequence


def _indexes(rng, H, g, d, key_dtype, n_seq=6):
    store = np.zeros((n_seq * ROW, H, d), np.float32)
    idxs, qs = [], []
    for b in range(n_seq):
        n = int(rng.integers(20, 500))
        K, Q = lowrank_keys(rng, n + 60, d, heads=H, group=g, n_queries=1)
        pos = b * ROW + rng.permutation(ROW)[: n + 60]  # scattered slots, as after radix-cache reuse
        store[pos] = K.transpose(1, 0, 2)
        idx = PagedDCIIndex(H, d, config=IndexConfig(page_size=8, key_dtype=key_dtype))
        idx.build(K[:, :n], positions=pos[:n])
        if b % 2:  # decode inserts (partly filled pages, arrays grown)
            idx.insert(K[:, n:], positions=pos[n:])
        if b % 3 == 2:  # deleted tokens, freed pages
            idx.delete(np.arange(0, n, 4))
        idxs.append(idx)
        qs.append(Q[0])
    return idxs, np.stack(qs).astype(np.float32), to_storage(store, "bfloat16")


def _one_at_a_time(idxs, Q, P, merge, store):
    out = [select_baseline(idx, Q[b], P, "exact", merge, store) for b, idx in enumerate(idxs)]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


@pytest.mark.parametrize("key_dtype", ["int8", "bfloat16", "float32"])
@pytest.mark.parametrize("merge", ["rank", "mass"])
@pytest.mark.parametrize("H,g,d", [(3, 3, 64), (2, 7, 32), (2, 4, 16), (1, 1, 16)])
def test_batch_equals_one_sequence_at_a_time(rng, key_dtype, merge, H, g, d):
    idxs, Q, store = _indexes(rng, H, g, d, key_dtype)
    states = StateList()
    for P in (1, 6, 100):  # 100: more pages than every index holds (-1 padded)
        pages, slots = scan_index_batch(states, idxs, Q, P, merge=merge, store=store)
        want_pages, want_slots = _one_at_a_time(idxs, Q, P, merge, store)
        np.testing.assert_array_equal(pages, want_pages)
        np.testing.assert_array_equal(slots, want_slots)
        assert (pages >= 0).any() and (pages[:, :, -1] < 0).all() == (P == 100)


def test_state_list_follows_grown_arrays_copies_and_dropped_slots(rng):
    """An index whose arrays a later insert replaces, a copy-on-write copy, and a slot freed and reused answer
    from their own current arrays (a stale ``positions`` would write the old slots)."""
    H, g, d = 2, 4, 32
    idxs, Q, store = _indexes(rng, H, g, d, "int8", n_seq=3)
    states = StateList()
    scan_index_batch(states, idxs, Q, 5, merge="mass", store=store)
    grown = idxs[0]
    before = grown.storage_version
    K, _ = lowrank_keys(rng, 3000, d, heads=H, group=g, n_queries=1)
    full = np.concatenate([store, to_storage(K.transpose(1, 0, 2), "bfloat16")])  # the new tokens' rows
    pos = np.arange(store.shape[0], store.shape[0] + 3000)
    grown.insert(K, positions=pos)
    assert grown.storage_version != before  # the arrays were replaced
    copy = idxs[1].copy()
    states.drop(idxs[2])
    batch = [grown, copy, idxs[1]]
    pages, slots = scan_index_batch(states, batch, Q[[0, 1, 1]], 5, merge="mass", store=full)
    want_pages, want_slots = _one_at_a_time(batch, Q[[0, 1, 1]], 5, "mass", full)
    np.testing.assert_array_equal(pages, want_pages)
    np.testing.assert_array_equal(slots, want_slots)
    assert (slots[0] >= store.shape[0]).any()  # the grown index's new tokens can be chosen


def test_bad_arguments(rng):
    idxs, Q, store = _indexes(rng, 2, 2, 16, "int8", n_seq=2)
    states = StateList()
    with pytest.raises(ValueError, match="key store"):
        scan_index_batch(states, idxs, Q, 4)
    with pytest.raises(ValueError, match="Q must be"):
        scan_index_batch(states, idxs, Q[:1], 4, store=store)
    with pytest.raises(ValueError, match="n_pages"):
        scan_index_batch(states, idxs, Q, 0, store=store)
    other = PagedDCIIndex(2, 16, config=IndexConfig(page_size=8, key_dtype="float32"))
    other.build(np.ones((2, 10, 16), np.float32))
    with pytest.raises(ValueError, match="one shape and key dtype"):
        scan_index_batch(states, [idxs[0], other], Q, 4, store=store)


@pytest.mark.parametrize("merge", ["rank", "mass"])
def test_overflowing_scores_give_the_same_pages_as_one_at_a_time(rng, merge):
    """Finite queries whose scores overflow to infinity (3e37 x a key) give the pages the per-sequence path gives:
    the merges are never compiled with the fast-math kernel's flags (under them the mass merge's checks assumed
    no infinity and raised ZeroDivisionError inside numba)."""
    idxs, Q, store = _indexes(rng, 2, 4, 16, "int8", n_seq=4)
    Q[1] *= 3e37
    Q[2, 0, 0] = 3e38
    pages, slots = scan_index_batch(StateList(), idxs, Q, 4, merge=merge, store=store)
    want_pages, want_slots = _one_at_a_time(idxs, Q, 4, merge, store)
    np.testing.assert_array_equal(pages, want_pages)
    np.testing.assert_array_equal(slots, want_slots)
