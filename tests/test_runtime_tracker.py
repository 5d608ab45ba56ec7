"""The runtime's slot-keyed sequence tracker against a real indexer process, and the torch sparse decode
path against dense attention."""

from __future__ import annotations

import numpy as np
import pytest

from icecache_sglang.indexer.launcher import Indexer
from icecache_sglang.runtime.sequences import SequenceTracker

torch = pytest.importorskip("torch")

H, D, SLOTS, LAYERS = 2, 16, 4096, 2
SINK, WINDOW, BUDGET, BLOCK = 4, 4, 32, 8


@pytest.fixture(scope="module")
def indexer():
    with Indexer.launch(num_layers=LAYERS, num_kv_heads=H, head_dim=D, num_slots=SLOTS, timeout_s=10.0) as ix:
        rng = np.random.default_rng(0)
        ix.store.keys[:] = rng.standard_normal(ix.store.keys.shape).astype(np.float32)
        yield ix


@pytest.fixture
def tracker(indexer):
    indexer.client.reset()
    indexer.client.sync()
    return SequenceTracker(indexer.client, list(range(LAYERS)), SLOTS, sink=SINK, window=WINDOW, budget=BUDGET,
                           block=BLOCK)


def stats(ix):
    ix.client.sync()
    return ix.client.stats()


def test_short_requests_are_not_indexed_and_long_ones_up_to_the_window(indexer, tracker):
    row = np.arange(100, 200, dtype=np.int32)
    assert not tracker.update(1, row, BUDGET)
    assert stats(indexer).sequences == 0
    assert tracker.update(1, row, 60)
    assert tracker.indexed_end(1) == 60 - WINDOW
    s = stats(indexer)
    assert (s.sequences, s.tokens) == (1, LAYERS * (60 - WINDOW - SINK))
    # decode: fewer than a block waiting -> nothing sent; a block -> sent
    tracker.update(1, row, 60 + BLOCK - 1, block=BLOCK)
    assert tracker.indexed_end(1) == 60 - WINDOW
    tracker.update(1, row, 60 + BLOCK, block=BLOCK)
    assert tracker.indexed_end(1) == 60 + BLOCK - WINDOW


def test_prefix_share_then_new_tokens_only_and_supersede(indexer, tracker):
    row_a = np.arange(1000, 1100, dtype=np.int32)
    tracker.update(1, row_a, 80)
    tracker.row_freed(1)  # finished: retained for the radix cache
    assert tracker.summary()["retained"] == 1
    # next turn on another row: same slots for 80 positions, then new ones
    row_b = np.concatenate([row_a[:80], np.arange(3000, 3040, dtype=np.int32)])
    sent = tracker.counters.indexed_tokens
    tracker.update(2, row_b, 120)
    assert tracker.counters.shared_tokens == 80 - WINDOW - SINK
    assert tracker.counters.indexed_tokens - sent == 120 - 80  # positions [76, 116)
    tracker.row_freed(2)  # covers turn 1 entirely: turn 1's index goes
    assert tracker.summary()["retained"] == 1 and tracker.counters.superseded == 1
    assert stats(indexer).sequences == 1


def test_freed_slots_release_retained_and_rebuild_live(indexer, tracker):
    row = np.arange(500, 600, dtype=np.int32)
    tracker.update(1, row, 70)
    tracker.row_freed(1)
    tracker.update(2, np.arange(700, 800, dtype=np.int32), 70)
    tracker.slots_freed(np.array([520]))  # evicted from the radix tree
    assert tracker.summary()["retained"] == 0
    tracker.slots_freed(np.array([720]))  # a live request's slot was re-pointed and freed
    assert tracker.live[2].stale
    new_row = np.arange(700, 800, dtype=np.int32)
    new_row[20] = 900
    tracker.update(2, new_row, 71, block=BLOCK)
    assert not tracker.live[2].stale and tracker.counters.stale_rebuilds == 1
    assert 720 not in tracker.live[2].slots and 900 in tracker.live[2].slots
    s = stats(indexer)
    assert (s.sequences, s.tokens) == (1, LAYERS * (71 - WINDOW - SINK))
    assert int(tracker.slot_refs.sum()) == 71 - WINDOW - SINK


def test_verify_catches_a_repointed_row(indexer, tracker):
    row = np.arange(100, 200, dtype=np.int32)
    tracker.update(1, row, 60)
    row2 = row.copy()
    row2[10] = 4000
    tracker.update(1, row2, 60, verify=True)
    assert tracker.counters.stale_rebuilds == 1 and 4000 in tracker.live[1].slots


def test_clear_forgets_everything(indexer, tracker):
    for r in range(1, 4):
        tracker.update(r, np.arange(100 * r, 100 * r + 90, dtype=np.int32), 90)
    tracker.row_freed(1)
    tracker.clear()
    assert tracker.summary() == {"live": 0, "retained": 0, "retained_tokens": 0, "slots_referenced": 0}
    assert stats(indexer).sequences == 0


def test_torch_sparse_decode_equals_dense_attention_on_the_selected_tokens():
    from icecache_sglang.runtime.attention import DecodePlan, TorchSparseDecode

    g = torch.Generator().manual_seed(0)
    B, Hkv, G, d, S, T = 3, 2, 4, 16, 300, 40
    k_cache, v_cache = torch.randn(S, Hkv, d, generator=g), torch.randn(S, Hkv, d, generator=g)
    q = torch.randn(B, Hkv * G, d, generator=g)
    slots = torch.randint(0, S, (B, Hkv, T), generator=g)
    valid = torch.rand(B, Hkv, T, generator=g) > 0.3
    out = TorchSparseDecode().decode(q, k_cache, v_cache, DecodePlan(slots, valid), scale=0.25)
    for b in range(B):
        for h in range(Hkv):
            sel = slots[b, h][valid[b, h]]
            qs = q[b, h * G: (h + 1) * G]
            ref = torch.softmax(qs @ k_cache[sel, h].T * 0.25, -1) @ v_cache[sel, h]
            torch.testing.assert_close(out[b, h * G: (h + 1) * G], ref, rtol=1e-5, atol=1e-5)


def test_decode_updates_from_the_rows_positions_past_the_index(indexer, tracker):
    """A decode step hands the tracker only the row's positions from its index's end on (``offset``): the
    same tokens are indexed as from the whole row; a request without a current index must give its whole
    row, and says so."""
    row = np.arange(500, 700, dtype=np.int32)
    with pytest.raises(ValueError, match="do not cover"):
        tracker.update(1, row[SINK:], 60, offset=SINK)  # no index yet: its Build needs the whole row
    assert tracker.update(1, row, 60)
    end = tracker.indexed_end(1)
    assert np.array_equal(tracker.indexed_slots(1), row[SINK:end])
    with pytest.raises(ValueError, match="do not cover"):
        tracker.update(1, row[end + 1:], 60 + BLOCK, block=BLOCK, offset=end + 1)  # a gap before the new tokens
    assert tracker.update(1, row[end:60 + BLOCK], 60 + BLOCK, block=BLOCK, offset=end)
    assert tracker.indexed_end(1) == 60 + BLOCK - WINDOW
    assert np.array_equal(tracker.indexed_slots(1), row[SINK:60 + BLOCK - WINDOW])
    tracker.slots_freed(row[10:11])  # stale: rebuilt from the whole row only
    with pytest.raises(ValueError, match="do not cover"):
        tracker.update(1, row[end:], 61 + BLOCK, offset=end)
    assert len(tracker.indexed_slots(1)) == 0
