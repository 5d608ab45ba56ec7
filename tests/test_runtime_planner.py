"""The decode planner (``runtime/plan.py``) against a real indexer process (no SGLang): with asynchronous
selection (``max_stale_steps``) a request decodes densely until its first selections can be answered at
once, i.e. while any of its index writes is unanswered (its first selections are waited for, and would
queue behind the Inserts sent while its index was built: time-outs and fallbacks, seen on the H100 at
the switch from dense to sparse); once it has selections, unanswered Inserts no longer hold it back."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from icecache_sglang.indexer.launcher import Indexer
from icecache_sglang.runtime.config import IceCacheConfig
from icecache_sglang.runtime.host_query import HostQuery
from icecache_sglang.runtime.metrics import IceCacheMetrics
from icecache_sglang.runtime.plan import Planner
from icecache_sglang.runtime.selection import Selector
from icecache_sglang.runtime.sequences import SequenceTracker
from icecache_sglang.runtime.supervisor import IndexerSupervisor

H, D, L, C, GROUP, SLOTS = 2, 16, 2, 16, 2, 4096
CFG = IceCacheConfig(budget_tokens=96, page_size=C, sink_tokens=16, window_tokens=16, dense_layers=0,
                     layer_reuse=1, max_stale_steps=2, selection_deadline_ms=300)


@pytest.fixture
def planner():
    with Indexer.launch(num_layers=L, num_kv_heads=H, head_dim=D, num_slots=SLOTS, timeout_s=5.0) as ix:
        ix.store.keys[:] = np.random.default_rng(0).standard_normal(ix.store.keys.shape).astype(np.float32)
        m = IceCacheMetrics()
        sup = IndexerSupervisor(ix, m)
        tracker = SequenceTracker(ix.client, list(range(L)), SLOTS, sink=CFG.sink_tokens, window=CFG.window_tokens,
                                  budget=CFG.budget_tokens, block=C)
        req_to_token = torch.arange(1, SLOTS, dtype=torch.int32)[None, :]  # one row: position i at slot i + 1
        yield Planner(tracker=tracker, selector=Selector(sup, H, L, m), metrics=m, req_to_token=req_to_token,
                      num_kv_heads=H, store_layer={0: 0, 1: 1}, layers_per_anchor={0: 1, 1: 1},
                      slots_device=torch.device("cpu")), ix, m


def sparse_rows(planner: Planner, n: int, plan_layers: bool = False) -> list[int]:
    """One decode step of the request on row 0 at length ``n``: the rows it decodes sparsely (planning its
    anchor layers, as the backend does, when ``plan_layers``)."""
    step = planner.begin([0], [n], CFG)
    if step is None:
        return []
    if plan_layers:
        q = torch.from_numpy(np.random.default_rng(n).standard_normal((1, H * GROUP, D)).astype(np.float32))
        for anchor in (0, 1):
            planner.plan(step, anchor, q, CFG, CFG.query_params())
    return step.sparse.tolist()


def test_asynchronous_selection_starts_when_its_first_selections_can_be_answered(planner):
    planner, ix, m = planner
    n = 600
    assert sparse_rows(planner, n) == []  # its Build goes out: dense while indexing
    ix.client.sync()
    pid = ix.process.pid
    os.kill(pid, signal.SIGSTOP)  # every write from now on stays unanswered
    try:
        n += C
        assert sparse_rows(planner, n) == []  # no Insert unanswered before this step: sparse would be fine,
        # but this step sends one (the row grew by a page) and asks for its first selections, held back by it
        n += 1
        held = m.dense_while_indexing_rows
        assert sparse_rows(planner, n) == []  # an unanswered Insert and no selection yet: dense (was sparse)
        assert m.dense_while_indexing_rows == held + 1
    finally:
        os.kill(pid, signal.SIGCONT)
    ix.client.sync()
    n += 1
    assert sparse_rows(planner, n, plan_layers=True) == [0]  # answered: its first selections
    assert m.fallbacks == 0
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(C + 1):  # an Insert goes out and stays unanswered
            n += 1
            rows = sparse_rows(planner, n, plan_layers=True)
        assert ix.client.pending_index_seqs(("insert",))
        assert rows == [0]  # with selections in hand, an unanswered Insert does not hold it back
    finally:
        os.kill(pid, signal.SIGCONT)


def test_plans_carry_their_compact_layout_as_the_decode_kernels_derive_it(planner):
    """A plan's host ``indptr`` / ``tokens`` and its ``rows`` (what FlashInfer's decode takes, so that it
    reads nothing back from the device per layer) equal what the Triton kernels derive from ``slots`` and
    ``valid`` (``kernels/decode_index.py``, run on CPU by Triton's interpreter)."""
    from icecache_sglang.kernels import plan_indptr, plan_rows, plan_rows_reference

    planner, ix, m = planner
    n = 600
    sparse_rows(planner, n)
    ix.client.sync()
    step = planner.begin([0], [n + 1], CFG)
    assert step is not None and step.sparse.tolist() == [0]
    q = torch.from_numpy(np.random.default_rng(1).standard_normal((1, H * GROUP, D)).astype(np.float32))
    for anchor in (0, 1):
        plan = planner.plan(step, anchor, q, CFG, CFG.query_params())
        assert plan.indptr.device.type == "cpu" and plan.tokens.device.type == "cpu"
        assert plan.indptr.dtype == torch.int32 and plan.rows.dtype == torch.int32
        indptr = plan_indptr(plan.valid)
        assert torch.equal(plan.indptr, indptr.cpu())
        assert torch.equal(plan.tokens, plan.valid.sum(-1))
        assert torch.equal(plan.rows, plan_rows(plan.slots, plan.valid, indptr))
        assert torch.equal(plan.rows, plan_rows_reference(plan.slots, plan.valid))
        assert 0 < int(plan.indptr[-1]) < H * (n + 1)  # sparse: fewer rows than every token of every head


class HeldQuery(HostQuery):
    """A layer's queries whose copy to the host has not landed until ``HeldQuery.landed`` (what a GPU's
    asynchronous copy looks like to the planner; on CPU the queries are on the host at once)."""

    landed = False

    def ready(self) -> bool:
        return HeldQuery.landed


def plan_step(planner: Planner, n: int, q: torch.Tensor) -> list:
    step = planner.begin([0], [n], CFG)
    assert step is not None and step.sparse.tolist() == [0]
    return [planner.plan(step, anchor, q, CFG, CFG.query_params()) for anchor in (0, 1)]


def assert_no_token_twice(plans) -> None:
    for plan in plans:
        for b in range(plan.slots.shape[0]):
            for h in range(H):
                s = plan.slots[b, h][plan.valid[b, h]]
                assert s.unique().numel() == s.numel(), f"a token attended twice: {sorted(s.tolist())}"


def test_asynchronous_queries_go_out_once_on_the_host_with_the_index_end_of_that_moment(planner):
    """With asynchronous selection a layer's queries go out once their copy to the host has landed (at a
    later layer or step; two steps later, waiting for it), never holding up the layer that made them. The
    index end of such a selection is read when it is sent: an Insert sent in between is answered first,
    and its pages may hold the inserted tokens, which the plan must then not attend a second time."""
    planner, ix, m = planner
    planner.host_query = HeldQuery
    q = torch.from_numpy(np.random.default_rng(3).standard_normal((1, H * GROUP, D)).astype(np.float32))
    n = 600
    sparse_rows(planner, n)  # the Build
    ix.client.sync()
    HeldQuery.landed = False
    n += 1
    plan_step(planner, n, q)  # first selections: waited for in the layer, so sent at once
    assert m.queries == 2 and m.queries_deferred == 0
    n += 1
    plan_step(planner, n, q)  # selections in hand: the new queries wait for their copy
    assert m.queries == 2 and m.queries_deferred == 2 and len(planner.cache.unsent) == 2
    # the next step indexes a page more; make its tokens the best match of these queries
    end = planner.tracker.indexed_end(0)
    n += C
    new_end = n - CFG.window_tokens
    group = q[0].reshape(H, GROUP, D).mean(1).numpy()
    ix.store.keys[:, end + 1: new_end + 1] = 50 * group[None, None]  # positions [end, new_end): slots + 1
    plans = plan_step(planner, n, q)  # the Insert goes out; the queries of the step before stay unsent
    assert planner.tracker.indexed_end(0) == new_end
    assert m.queries == 2 and len(planner.cache.unsent) == 2
    assert_no_token_twice(plans)
    n += 1
    plans = plan_step(planner, n, q)  # two steps on: sent (waiting for the copy), after that Insert
    assert m.queries >= 4 and m.fallbacks == 0
    assert_no_token_twice(plans)  # attended with their answers (the first selections are too old by now)
    ix.client.sync()
    for _ in range(3):  # their answers are installed and attended
        n += 1
        assert_no_token_twice(plan_step(planner, n, q))
    inserted = set(range(end + 1, new_end + 1))
    assert any(inserted & set(e.slots.ravel().tolist()) for e in planner.cache.entries.values())
    HeldQuery.landed = True
    sent = m.queries
    n += 1
    plan_step(planner, n, q)
    assert m.queries > sent and not planner.cache.unsent  # landed: sent from the layer that made them
