"""The decode planner (``runtime/plan.py``) against a real indexer process (no SGLang): with asynchronous
selection (``max_stale_steps``) a request decodes densely until its first selections are in: while any of
its index writes is unanswered (its first queries would queue behind the Inserts sent while its index was
built: time-outs and fallbacks, seen on the H100 at the switch from dense to sparse), then for one more
step whose anchor layers send its first queries without waiting (a first sparse step waited for every
layer's answer in turn); once it has selections, unanswered Inserts no longer hold it back. Also: queries
copied to the host without waiting, and an indexer that falls behind asked less often."""

from __future__ import annotations

import os
from dataclasses import replace
import signal
import time

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
#: a step that fetches first selections the next step must find: its queries expire max_stale_steps deadlines
#: after the step's, which a loaded machine's indexer can miss at 300 ms (the answer is then a fallback, not
#: kept, and the next step waits for a fresh one instead of reusing it)
PATIENT_MS = 4000.0


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


def sparse_rows(planner: Planner, n: int, plan_layers: bool = False, cfg: IceCacheConfig = CFG) -> list[int]:
    """One decode step of the request on row 0 at length ``n``: the rows it decodes sparsely (planning its
    anchor layers, as the backend does, when ``plan_layers``)."""
    step = planner.begin([0], [n], cfg)
    if plan_layers:  # as the backend does: a dense step's anchor layers send the queries of rows priming
        q = torch.from_numpy(np.random.default_rng(n).standard_normal((1, H * GROUP, D)).astype(np.float32))
        keys = torch.zeros((SLOTS + 1, H, D)) if cfg.token_rerank > 1 else None
        for anchor in (0, 1):
            if step is None:
                planner.prime(anchor, q, cfg, cfg.query_params())
            else:
                planner.plan(step, anchor, q, cfg, cfg.query_params(), keys=keys)
    return [] if step is None else step.sparse.tolist()


def answered(planner: Planner) -> None:
    """Wait until every query sent has its answer."""
    deadline = time.monotonic() + 10
    while not all(f.sent is None or planner.selector.ready(f.sent)
                  for msgs in planner.cache.messages.values() for f in msgs):
        assert time.monotonic() < deadline
        time.sleep(0.005)


def first_selections(planner: Planner, ix, n: int, cfg: IceCacheConfig = CFG) -> int:
    """After the request's Build (``n`` tokens): its index answered, one step fetching its first selections;
    returns the length after that step."""
    ix.client.sync()
    assert sparse_rows(planner, n + 1, plan_layers=True, cfg=replace(cfg, selection_deadline_ms=PATIENT_MS)) == []
    answered(planner)
    return n + 1


def test_asynchronous_selection_starts_when_its_first_selections_are_in(planner):
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
    sent = m.queries
    patient = replace(CFG, selection_deadline_ms=PATIENT_MS)
    assert sparse_rows(planner, n, plan_layers=True, cfg=patient) == []  # answered, no selection yet: dense while this
    assert m.queries == sent + 2 and m.primed_rows == 1  # step's anchor layers send its first queries
    answered(planner)
    n += 1
    reused = m.reused_selections
    assert sparse_rows(planner, n, plan_layers=True) == [0]  # sparse with them: made a step earlier,
    assert m.reused_selections == reused + 2 and m.fallbacks == 0  # nothing waited for (was: made and
    # waited for in this step, every layer in turn)
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
    n = first_selections(planner, ix, n)
    step = planner.begin([0], [n + 1], CFG)
    assert step is not None and step.sparse.tolist() == [0]
    q = torch.from_numpy(np.random.default_rng(1).standard_normal((1, H * GROUP, D)).astype(np.float32))
    choose, chosen = planner.cache.choose, {}

    def same_choice(step_sel, layer, *args, **kw):  # a layer planned twice below attends the same selection
        if layer not in chosen:
            chosen[layer] = choose(step_sel, layer, *args, **kw)
        return chosen[layer]

    planner.cache.choose = same_choice
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
        # a planner for FlashInfer lays out only this compact form, the same
        planner.plan_slots = False
        del step.plans[anchor]
        compact = planner.plan(step, anchor, q, CFG, CFG.query_params())
        planner.plan_slots = True
        assert compact.slots is None and compact.valid is None
        assert torch.equal(compact.indptr, plan.indptr) and torch.equal(compact.rows, plan.rows)
        assert torch.equal(compact.tokens, plan.tokens)


def test_a_reranked_compact_plan_is_filled_where_the_keys_are(planner):
    """With ``token_rerank``, a planner for FlashInfer (compact form only) writes the kept tokens into the plan's
    rows on the K plane's device (nothing read back per anchor layer on a GPU): the same ``tokens``, ``indptr``
    and ``rows`` as the tokens brought back to the host and laid out there, and as many kept tokens counted."""
    planner, ix, m = planner
    cfg = replace(CFG, token_rerank=2)
    keys = torch.from_numpy(np.random.default_rng(3).standard_normal((SLOTS + 1, H, D)).astype(np.float32))
    n = 600
    sparse_rows(planner, n, cfg=cfg)
    n = first_selections(planner, ix, n, cfg)
    step = planner.begin([0], [n + 1], cfg)
    assert step is not None and step.sparse.tolist() == [0]
    q = torch.from_numpy(np.random.default_rng(1).standard_normal((1, H * GROUP, D)).astype(np.float32))
    choose, chosen = planner.cache.choose, {}

    def same_choice(step_sel, layer, *args, **kw):
        if layer not in chosen:
            chosen[layer] = choose(step_sel, layer, *args, **kw)
        return chosen[layer]

    planner.cache.choose = same_choice
    for anchor in (0, 1):
        pages = step.selection.pages
        host = planner.plan(step, anchor, q, cfg, cfg.query_params(), keys=keys, scale=0.25)
        host_pages = step.selection.pages - pages
        planner.plan_slots = False
        del step.plans[anchor]
        compact = planner.plan(step, anchor, q, cfg, cfg.query_params(), keys=keys, scale=0.25)
        planner.plan_slots = True
        assert compact.slots is None
        assert torch.equal(compact.indptr, host.indptr) and torch.equal(compact.tokens, host.tokens)
        assert torch.equal(compact.rows, host.rows)
        assert step.selection.pages - pages - host_pages == host_pages > 0
        assert int(host.indptr[-1]) == int(host.tokens.sum())
    assert m.reranked_selections == 4


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


@pytest.fixture
def held(planner):
    planner[0].host_query = HeldQuery
    HeldQuery.landed = False
    yield planner
    HeldQuery.landed = False


def test_an_asynchronous_query_goes_out_at_the_next_anchor_layer_once_landed(held):
    """A layer's query whose copy has not landed is not sent by its layer; the next anchor layer of the same
    step sends it once it has (and its own at once)."""
    planner, ix, m = held
    q = torch.from_numpy(np.random.default_rng(4).standard_normal((1, H * GROUP, D)).astype(np.float32))
    n = 600
    sparse_rows(planner, n)
    HeldQuery.landed = True
    n = first_selections(planner, ix, n)
    HeldQuery.landed = False
    assert m.queries == 2
    n += 1
    step = planner.begin([0], [n], CFG)
    planner.plan(step, 0, q, CFG, CFG.query_params())
    assert m.queries == 2 and len(planner.cache.unsent) == 1
    HeldQuery.landed = True
    planner.plan(step, 1, q, CFG, CFG.query_params())
    assert m.queries == 4 and not planner.cache.unsent and m.queries_deferred == 1


def test_asynchronous_queries_go_out_once_on_the_host_with_the_index_end_of_that_moment(held):
    """With asynchronous selection a layer's queries go out once their copy to the host has landed (at a
    later layer or step; two steps later, waiting for it), never holding up the layer that made them. The
    index end of such a selection is read when it is sent: an Insert sent in between is answered first,
    and its pages may hold the inserted tokens, which the plan must then not attend a second time."""
    planner, ix, m = held
    q = torch.from_numpy(np.random.default_rng(3).standard_normal((1, H * GROUP, D)).astype(np.float32))
    n = 600
    sparse_rows(planner, n)  # the Build
    HeldQuery.landed = True
    n = first_selections(planner, ix, n)
    HeldQuery.landed = False
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


def test_an_indexer_that_falls_behind_is_asked_less_often(planner):
    """Asynchronous selection (here ``max_stale_steps`` 4) sends each layer's query every step while the
    indexer answers within the step after; once an answer comes two or more steps late, each layer asks
    only every ceil(4 / 2) = 2 steps (layers on alternate steps), so the indexer's queue shrinks instead of
    every layer's selection ageing past the bound (the H100's 128k steps that waited 150-400 ms)."""
    planner, ix, m = planner
    cfg = IceCacheConfig(**{**CFG.__dict__, "max_stale_steps": 4})
    q = torch.from_numpy(np.random.default_rng(5).standard_normal((1, H * GROUP, D)).astype(np.float32))
    n = 600
    planner.begin([0], [n], cfg)  # the Build
    ix.client.sync()
    n += 1
    assert planner.begin([0], [n], cfg) is None  # first selections fetched, densely
    for anchor in (0, 1):
        planner.prime(anchor, q, cfg, cfg.query_params())
    answered(planner)

    def step() -> int:
        """One decode step (both anchor layers planned); the queries it sent. Afterwards every query in flight
        has its answer (the indexer keeps up again)."""
        nonlocal n
        n += 1
        sent = m.queries
        st = planner.begin([0], [n], cfg)
        assert st is not None and st.sparse.tolist() == [0]
        for anchor in (0, 1):
            planner.plan(st, anchor, q, cfg, cfg.query_params())
        answered(planner)
        return m.queries - sent

    assert [step() for _ in range(3)] == [2, 2, 2]  # keeping up: both layers every step
    assert m.queries_spaced == 0
    os.kill(ix.process.pid, signal.SIGSTOP)
    try:
        n += 1
        st = planner.begin([0], [n], cfg)  # this step's queries stay unanswered for two steps
        for anchor in (0, 1):
            planner.plan(st, anchor, q, cfg, cfg.query_params())
        n += 1
        st = planner.begin([0], [n], cfg)
        for anchor in (0, 1):
            planner.plan(st, anchor, q, cfg, cfg.query_params())
    finally:
        os.kill(ix.process.pid, signal.SIGCONT)
    time.sleep(0.2)
    late = step()  # collects answers two steps late
    assert late == 2  # their selections were 3 steps old (>= ceil(4 / 2)): asked again
    spaced = [step() for _ in range(6)]
    assert spaced == [1] * 6, spaced  # one layer per step, alternating
    assert m.queries_spaced == 6 and m.fallbacks == 0
    assert m.selection_age_steps_max <= 4


def test_a_request_stays_dense_until_every_anchor_layer_has_its_first_selection(held):
    """Answers at some anchor layers only (the indexer answers in order; a copy still landing) keep the
    request dense and fetching: going sparse then would wait at every layer still missing (review of the
    first version, which counted a selection at any layer)."""
    planner, ix, m = held
    q = torch.from_numpy(np.random.default_rng(6).standard_normal((1, H * GROUP, D)).astype(np.float32))
    n = 600
    sparse_rows(planner, n)
    ix.client.sync()
    n += 1
    assert planner.begin([0], [n], CFG) is None
    HeldQuery.landed = True
    planner.prime(0, q, CFG, CFG.query_params())  # layer 0's query goes out
    HeldQuery.landed = False
    planner.prime(1, q, CFG, CFG.query_params())  # layer 1's copy has not landed
    answered(planner)
    n += 1
    assert planner.begin([0], [n], CFG) is None and m.primed_rows == 2  # still fetching layer 1's
    for anchor in (0, 1):
        planner.prime(anchor, q, CFG, CFG.query_params())
    HeldQuery.landed = True
    n += 1
    early = planner.begin([0], [n], CFG)  # layer 1's query went out at this step's start
    # (on a loaded machine its answer can come back within this begin: then the step goes sparse, rightly; the
    # full suite saw it once)
    assert early is None or early.sparse.tolist() == [0]
    answered(planner)
    n += 1
    step = planner.begin([0], [n], CFG)
    assert step is not None and step.sparse.tolist() == [0]
    for anchor in (0, 1):
        planner.plan(step, anchor, q, CFG, CFG.query_params())
    assert m.fallbacks == 0 and not step.selection.timed_out


def test_a_request_whose_first_selections_never_come_goes_sparse_after_a_few_steps(planner):
    """A stopped indexer answers none of a request's first queries: after ``PRIME_STEPS`` dense steps it
    goes sparse, waits within the step's deadline and falls back, as any selection would."""
    from icecache_sglang.runtime.plan import PRIME_STEPS

    planner, ix, m = planner
    n = 600
    sparse_rows(planner, n)
    ix.client.sync()
    os.kill(ix.process.pid, signal.SIGSTOP)
    try:
        rows = []
        for _ in range(PRIME_STEPS + 1):
            n += 1
            rows.append(sparse_rows(planner, n, plan_layers=True))
    finally:
        os.kill(ix.process.pid, signal.SIGCONT)
    assert rows == [[]] * PRIME_STEPS + [[0]] and m.primed_rows == PRIME_STEPS
    assert m.fallbacks > 0


class CountingRows:
    """``req_to_token`` counting the entries a planner reads from it."""

    def __init__(self, t: torch.Tensor):
        self.t, self.read = t, 0

    @property
    def device(self):
        return self.t.device

    def __getitem__(self, key):
        out = self.t[key]
        self.read += out.numel()
        return out


def test_a_decode_step_reads_only_the_sink_and_the_tail_of_an_indexed_row(planner):
    """A request with an index reads its sink and its positions past the index from ``req_to_token`` per
    step (on a GPU a 128k-token row was a 512 KB copy and a stream sync per request and step); the slots
    of the positions between are its index's, and the step's plans are those of the whole row."""
    planner, ix, m = planner
    whole = planner.req_to_token[0]
    rows = planner.req_to_token = CountingRows(planner.req_to_token)
    assert planner.begin([0], [CFG.budget_tokens], CFG) is None and rows.read == 0  # dense on SGLang's backend
    n = 600
    sparse_rows(planner, n)  # its Build: the whole row
    assert rows.read == n
    n = first_selections(planner, ix, n)
    for _ in range(2 * C + 3):  # across Inserts, with selections of earlier steps (older index ends)
        n += 1
        rows.read = 0
        step = planner.begin([0], [n], CFG)
        assert step is not None and step.sparse.tolist() == [0]
        assert rows.read <= CFG.sink_tokens + CFG.window_tokens + C  # was n
        rs, end = step.row_slots[0], planner.tracker.indexed_end(0)
        for x in range(0, n + 1, 7):
            assert np.array_equal(rs.since(x), whole[x:n].numpy())
        assert np.array_equal(step.fixed[0][0], whole[:CFG.sink_tokens].numpy())
        assert np.array_equal(step.fixed[0][1], whole[end:n].numpy())
        q = torch.from_numpy(np.random.default_rng(n).standard_normal((1, H * GROUP, D)).astype(np.float32))
        for anchor in (0, 1):
            plan = planner.plan(step, anchor, q, CFG, CFG.query_params())
            attended = set(plan.slots[0, 0][plan.valid[0, 0]].tolist())
            assert set(whole[:CFG.sink_tokens].tolist()) | set(whole[end:n].tolist()) <= attended
        assert rows.read <= CFG.sink_tokens + CFG.window_tokens + C
    assert m.reused_selections > 0


def test_the_compact_layout_equals_the_one_derived_from_the_full_plan():
    """``compact_layout`` (what a planner for FlashInfer lays out, without the full ``slots`` / ``valid``)
    gives the offsets and rows ``Planner.plan`` derives from ``full_layout``, for sparse requests (pages
    with padding), requests attending to every token (laid out once per step), and an empty tail."""
    from icecache_sglang.runtime.plan import compact_layout, full_layout

    rng = np.random.default_rng(8)
    for trial in range(50):
        B, Hk = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        fixed, picked = [], {}
        for b in range(B):
            if rng.random() < 0.4:  # every token
                fixed.append((rng.permutation(5000)[: rng.integers(1, 400)], np.empty(0, np.int64)))
                continue
            fixed.append((rng.permutation(5000)[: rng.integers(0, 8)], rng.permutation(5000)[: rng.integers(0, 20)]))
            p = rng.permutation(5000)[: Hk * 48].reshape(Hk, 48).astype(np.int64)
            p[rng.random(p.shape) < 0.3] = -1
            picked[b] = p
        slots, valid = full_layout(fixed, picked, Hk)
        dense: dict = {}
        for _ in range(2):  # the second time from the step's cache of every-token rows
            tokens, indptr, rows = compact_layout(fixed, picked, Hk, dense)
            assert np.array_equal(tokens, valid.sum(-1))
            assert np.array_equal(indptr[1:], np.cumsum(valid.sum(-1).reshape(-1)))
            assert np.array_equal(rows, (slots * Hk + np.arange(Hk)[None, :, None])[valid].astype(np.int32))
