"""The offloaded decode's device pool (``runtime/pool/device_pool.py``): lanes of fixed size filled from the
host pool, hits kept across steps, only misses copied."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icecache_sglang.runtime.pool.device_pool import DeviceKVPool

H, D, SLOTS = 3, 4, 500


def make(lanes=4, lane_rows=40, layers=(0, 1, 2), groups=None):
    groups = groups or {layer: 0 for layer in layers}
    return DeviceKVPool(num_layers=len(groups), groups=groups, lanes=lanes, lane_rows=lane_rows, head_num=H,
                        head_dim=D, v_head_dim=D, dtype=torch.float32, device="cpu", num_slots=SLOTS)


def host(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SLOTS, H, D, generator=g), torch.randn(SLOTS, H, D, generator=g)


def random_plan(rng, B, T, shared_from=None, keep=0.8):
    """Per (request, head) T distinct slots (-1 padded at random lengths); with ``shared_from``, a share of
    the previous plan's slots stays (what consecutive decode steps do)."""
    slots = np.full((B, H, T), -1, np.int64)
    for b in range(B):
        for h in range(H):
            n = rng.integers(T // 2, T + 1)
            pool = rng.permutation(np.arange(1 + 100 * b, 100 * (b + 1)))  # each request its own slots
            if shared_from is not None:
                prev = shared_from[b, h][shared_from[b, h] >= 0]
                kept = prev[rng.random(len(prev)) < keep]
                fresh = [s for s in pool if s not in set(kept)]
                pick = np.concatenate([kept, fresh])[:n]
            else:
                pick = pool[:n]
            slots[b, h, :n] = rng.permutation(pick)
    return slots


def check(pool, layer, rows, slots, hk, hv):
    valid = slots >= 0
    b, h, t = np.nonzero(valid)
    r = torch.from_numpy(rows[b, h, t])
    s = torch.from_numpy(slots[b, h, t])
    hh = torch.from_numpy(h)
    assert torch.equal(pool.k[layer][r, hh], hk[s, hh]) and torch.equal(pool.v[layer][r, hh], hv[s, hh])
    assert (rows[~valid] == 0).all() and (rows[valid] > 0).all()
    # within one (request, head) every valid entry has its own row, inside that request's lane
    for bi in range(rows.shape[0]):
        for hi in range(H):
            got = rows[bi, hi][valid[bi, hi]]
            assert len(set(got.tolist())) == len(got)


def test_rows_hold_the_plan_slots_across_steps_and_only_misses_move():
    rng = np.random.default_rng(0)
    hk, hv = host()
    pool = make()
    rows_before = pool.nbytes
    lanes = pool.lanes_for([7, 3, 11])
    plan = None
    for step in range(30):
        plan = random_plan(rng, 3, 32, shared_from=plan)
        loaded0, hit0 = pool.stats.rows_loaded, pool.stats.rows_hit
        rows, misses = pool.map_plan(0, lanes, plan, plan >= 0)
        for layer in (0, 1, 2):
            pool.load(layer, misses, hk * (layer + 1), hv - layer)
            check(pool, layer, rows, plan, hk * (layer + 1), hv - layer)
        n_valid = int((plan >= 0).sum())
        assert pool.stats.rows_hit - hit0 + len(misses[0]) == n_valid
        assert pool.stats.rows_loaded - loaded0 == 3 * len(misses[0])
        if step > 0:  # ~80% of each step's slots were already there
            assert len(misses[0]) < 0.5 * n_valid
    assert pool.nbytes == rows_before  # fixed size


def test_lanes_are_per_request_and_released():
    pool = make(lanes=2)
    a = pool.lanes_for([5, 6])
    assert sorted(a.tolist()) == [0, 1] and pool.lanes_for([6]).tolist() == [a[1]]
    with pytest.raises(RuntimeError, match="does not fit the device pool's 2 lanes"):
        pool.lanes_for([5, 6, 9])
    pool.release(5)
    assert pool.lanes_for([9]).tolist() == [a[0]] and pool.lanes_in_use == 2
    pool.clear()
    assert pool.lanes_in_use == 0


def test_a_full_pool_takes_the_lane_of_a_request_outside_the_batch():
    """A lane left to a request that is not decoding (paused, or a release that never came) is reclaimed
    instead of failing the step; its rows are not counted as hits for the new owner."""
    rng = np.random.default_rng(3)
    hk, hv = host()
    pool = make(lanes=2)
    plan = random_plan(rng, 1, 12)
    for row in (5, 6):
        rows, misses = pool.map_plan(0, pool.lanes_for([row]), plan, plan >= 0)
        pool.load(0, misses, hk, hv)
    lanes = pool.lanes_for([6, 9])  # 5 is not in the batch: its lane goes to 9
    assert 5 not in pool.lane_of and pool.lane_of[9] == lanes[1]
    rows, misses = pool.map_plan(0, lanes, np.concatenate([plan, plan]), np.concatenate([plan, plan]) >= 0)
    assert len(misses[0]) == int((plan >= 0).sum())  # row 6 hit everything, row 9 loaded everything


def test_a_slot_named_twice_keeps_both_copies():
    hk, hv = host()
    pool = make(lanes=1)
    plan = np.full((1, H, 4), -1, np.int64)
    plan[0, :, :3] = 3
    lanes = pool.lanes_for([1])
    for step in range(3):
        rows, misses = pool.map_plan(0, lanes, plan, plan >= 0)
        pool.load(0, misses, hk, hv)
        check_rows = rows[0, 0, :3]
        assert len(set(check_rows.tolist())) == 3
        assert len(misses[0]) == (3 * H if step == 0 else 0)


def test_a_released_lane_holds_nothing_of_its_last_request():
    rng = np.random.default_rng(1)
    hk, hv = host()
    pool = make(lanes=1)
    plan = random_plan(rng, 1, 20)
    rows, misses = pool.map_plan(0, pool.lanes_for([1]), plan, plan >= 0)
    pool.load(0, misses, hk, hv)
    pool.release(1)
    rows, misses = pool.map_plan(0, pool.lanes_for([2]), plan, plan >= 0)  # same slots, new owner
    assert len(misses[0]) == int((plan >= 0).sum())  # nothing counted as a hit


def test_groups_keep_their_own_rows():
    rng = np.random.default_rng(2)
    hk, hv = host()
    pool = make(groups={0: 0, 1: 0, 2: 2})
    lanes = pool.lanes_for([1, 2])
    pa, pb = random_plan(rng, 2, 16), random_plan(rng, 2, 16)
    ra, ma = pool.map_plan(0, lanes, pa, pa >= 0)
    rb, mb = pool.map_plan(2, lanes, pb, pb >= 0)
    for layer, (r, m, p) in {0: (ra, ma, pa), 1: (ra, ma, pa), 2: (rb, mb, pb)}.items():
        pool.load(layer, m, hk, hv)
        check(pool, layer, r, p, hk, hv)


def test_a_plan_wider_than_a_lane_is_refused():
    pool = make(lane_rows=8)
    plan = np.arange(1, 1 + 2 * H * 9).reshape(2, H, 9)
    with pytest.raises(RuntimeError, match="does not fit a lane"):
        pool.map_plan(0, pool.lanes_for([1, 2]), plan, plan >= 0)


def test_a_freed_slot_is_forgotten_by_the_lanes_of_live_requests():
    """SGLang frees slots of a request that keeps decoding (its prompt's duplicate of a cached prefix, freed
    after the row was re-pointed; beam search's orphans) and hands them out again, possibly to that request's
    own next token. A lane still naming the slot would count it as a hit and attend to the old KV: a freed
    slot is forgotten by every lane, and the next plan naming it loads its new KV."""
    rng = np.random.default_rng(4)
    hk, hv = host()
    pool = make(lanes=2, groups={0: 0, 1: 0, 2: 2})
    lanes = pool.lanes_for([1, 2])
    plan = random_plan(rng, 2, 16)
    for group in (0, 2):
        rows, misses = pool.map_plan(group, lanes, plan, plan >= 0)
        pool.load(group, misses, hk, hv)
    freed = np.unique(plan[0, 0][plan[0, 0] >= 0])[:5]
    pool.slots_freed(freed)
    hk[freed], hv[freed] = hk[freed] + 1, hv[freed] - 1  # reallocated: new KV at the same slots
    for group in (0, 2):
        rows, misses = pool.map_plan(group, lanes, plan, plan >= 0)
        named = np.isin(plan, freed)
        assert len(misses[0]) == int(named.sum())  # every entry naming a freed slot, in any head or lane
        pool.load(group, misses, hk, hv)
        check(pool, group, rows, plan, hk, hv)
    pool.slots_freed(np.empty(0, np.int64))  # nothing freed: nothing forgotten
    rows, misses = pool.map_plan(0, lanes, plan, plan >= 0)
    assert len(misses[0]) == 0
