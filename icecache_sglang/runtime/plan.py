"""A decode step's plans: per (request, KV head), the KV rows decode attention reads at each anchor layer.

One plan type serves both attention paths (``attention/``: a ``DecodePlan`` of rows ``[B, H, T]`` and a
validity mask): without offload the rows are SGLang's KV slots; with ``offload`` they are rows of the
device pool (``pool/device_pool.py``), each layer copying its missed rows first.

``Planner.begin`` (once per forward pass, from ``init_forward_metadata``) brings each long request's index
up to date and starts the step's selection (one deadline for the whole step); while the indexer is behind
(a first index being built, earlier writes unanswered) the step attends densely instead (``while_indexing``); ``Planner.plan`` (at each
anchor layer, from ``forward_decode``) asks for that layer's pages and lays out, per (request, KV head):
the sink, the selected pages' slots, the unindexed tail. Requests within the budget attend to all their
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .attention import DecodePlan
from .config import IceCacheConfig
from .host_query import HostQuery
from .rerank import rerank_tokens
from .transfer import host_for, to_device
from .metrics import IceCacheMetrics
from .pool import DeviceKVPool
from .selection import Selector, StepSelection
from .selection_cache import SelectionCache
from .sequences import SequenceTracker


@dataclass
class RowSlots:
    """One batch entry's KV slots for positions ``[0, n)`` as a decode step reads them. A request decoding
    with an index fetches only its sink (``head``, positions ``[0, len(head))``) and what follows its index
    (``tail``, positions ``[start, n)``) from ``req_to_token``; the positions between are the slots its
    index holds (``indexed``: positions ``[sink, ...)``, the tracker's copy). Any other request fetches its
    whole row (``tail`` from ``start`` 0)."""

    head: np.ndarray
    tail: np.ndarray
    start: int = 0
    indexed: np.ndarray | None = None
    sink: int = 0

    def since(self, x: int) -> np.ndarray:
        """The slots of positions ``[x, n)``."""
        if x >= self.start:
            return self.tail[x - self.start:]
        parts = [self.head[x:]] if x < len(self.head) else []
        parts.append(self.indexed[max(x, self.sink) - self.sink: self.start - self.sink])
        parts.append(self.tail)
        return np.concatenate(parts)


@dataclass
class DecodeStep:
    """Decode-step state shared by the layers of one forward pass."""

    rows: np.ndarray  # req_to_token row per batch entry
    lens: np.ndarray  # sequence length per batch entry (including the token being decoded)
    sparse: np.ndarray  # batch entries decoded sparsely
    seqs: list[int]
    fixed: list[tuple[np.ndarray, np.ndarray]]  # per batch entry: (slots before, slots after) the selected pages
    n_pages: int  # pages per KV head asked for (the budget's, at most the longest index's token count)
    selection: StepSelection | None  # None when no request decodes sparsely (offload: dense plans only)
    plans: dict[int, DecodePlan] = field(default_factory=dict)  # anchor layer -> plan
    lanes: np.ndarray | None = None  # offload: each batch entry's lane in the device pool
    misses: dict[int, tuple] = field(default_factory=dict)  # offload: anchor layer -> rows each layer copies
    row_slots: list[RowSlots] = field(default_factory=list)  # per batch entry: its slots, positions [0, len)
    rows_loaded: int = 0  # offload: (token, KV head) rows copied host -> device this step, all layers
    sparse_index: torch.Tensor | None = None  # ``sparse`` on the queries' device (made at the first anchor)
    dense_rows: dict[int, np.ndarray] = field(default_factory=dict)  # compact plans: rows of requests attending
    # to every token (the same at every anchor layer of the step)


#: a request fetches its first selections densely for at most this many steps, then waits for what is missing
#: (its first queries' answers fell back or expired: the indexer is not keeping up)
PRIME_STEPS = 4


@dataclass
class PrimeStep:
    """The rows of a decode step that attend densely while their first selections are fetched (asynchronous
    selection): each anchor layer sends their queries and nobody waits for the answers."""

    index: np.ndarray  # batch entries
    seqs: list[int]
    n_pages: int
    selection: StepSelection
    q_index: torch.Tensor | None = None  # ``index`` on the queries' device (made at the first anchor)


class Planner:
    def __init__(self, *, tracker: SequenceTracker, selector: Selector, metrics: IceCacheMetrics,
                 req_to_token: torch.Tensor, num_kv_heads: int, store_layer: dict[int, int],
                 layers_per_anchor: dict[int, int], slots_device: torch.device,
                 device_pool: DeviceKVPool | None = None, plan_slots: bool = True):
        self.tracker, self.selector, self.metrics = tracker, selector, metrics
        # step_reuse / max_stale_steps
        self.cache = SelectionCache(selector, metrics, num_kv_heads, tracker.indexed_ends_of)
        self.host_query = HostQuery  # a layer's queries to the host (a test may slow the copy down)
        self.priming: PrimeStep | None = None  # this decode step's rows fetching their first selections
        self._priming_steps: dict[int, int] = {}  # sequence -> steps it has spent fetching them
        self.req_to_token = req_to_token
        self.H = num_kv_heads
        self.store_layer, self.layers_per_anchor = store_layer, layers_per_anchor
        self.slots_device = slots_device  # where plans of SGLang slots go (the KV pool's device)
        self.device_pool = device_pool
        self.plan_slots = plan_slots  # whether the attention path reads plans' slots / valid on the device

    def row_slots(self, row: int, n: int) -> np.ndarray:
        """KV slots of positions ``[0, n)`` of ``row`` (a view on CPU)."""
        return fetch_slots(self.req_to_token, [(row, 0, n)])[0]

    def _fetch_rows(self, rows: list[int], lens: list[int], cfg: IceCacheConfig) -> list[RowSlots]:
        """Each batch entry's slots for this step (:class:`RowSlots`): a request with a current index reads
        only its sink and its positions from its index's end on (a 128k-token row is 512 KB of
        ``req_to_token`` per step, of which sink + window + a block are needed); the others their whole row."""
        ranges, split = [], []
        for row, n in zip(rows, lens):
            if n > cfg.budget_tokens and self.tracker.is_sparse(row):
                split.append(True)
                ranges += [(row, 0, min(cfg.sink_tokens, n)), (row, min(self.tracker.indexed_end(row), n), n)]
            else:
                split.append(False)
                ranges.append((row, 0, n))
        parts = iter(fetch_slots(self.req_to_token, ranges))
        out = []
        for (row, n), two in zip(zip(rows, lens), split):
            if two:
                head, tail = next(parts), next(parts)
                out.append(RowSlots(head, tail, n - len(tail), sink=cfg.sink_tokens))
            else:
                whole = next(parts)
                out.append(RowSlots(whole, whole))
        return out

    # ------------------------------------------------------------------ once per step
    def begin(self, rows: list[int], lens: list[int], cfg: IceCacheConfig) -> DecodeStep | None:
        """The step's shared state, or None when every request decodes densely on SGLang's backend. Rows
        fetching their first selections (asynchronous selection) are in ``self.priming`` either way."""
        sparse, primed = [], []
        self.priming = None
        # the indexer is behind on a sequence when its index writes of earlier steps are unanswered, or its
        # first index (or a prefix's) goes out now: its queries would queue behind that work (other sequences'
        # are answered meanwhile); or on every sequence when it is not serving (restarting, rebuilding,
        # down): a selection would be a fallback
        if cfg.reuses_selections:  # ages count every decode step; finished requests' selections are dropped
            live = {st.seq for st in self.tracker.live.values()}
            self.cache.new_step(live)
            for seq in [s for s in self._priming_steps if s not in live]:
                del self._priming_steps[seq]
        else:
            self._priming_steps.clear()
            if self.cache.entries or self.cache.in_flight():  # the mode changed on a running server
                self.cache.clear()
        # sequences the indexer is behind on (None: every sequence, it is not serving)
        behind = self.selector.behind_seqs(builds_only=cfg.max_stale_steps > 0) if cfg.dense_while_indexing else set()
        # each row's slots, one device-to-host copy on a GPU (none when every request attends densely on
        # SGLang's backend: no step is made)
        long = self.device_pool is not None or any(n > cfg.budget_tokens for n in lens)
        row_slots = self._fetch_rows(rows, lens, cfg) if long else []
        for b, (row, n) in enumerate(zip(rows, lens)):
            if n <= cfg.budget_tokens:  # within the budget (a new, larger budget too): dense
                continue
            rs = row_slots[b]
            if rs.start and not self.tracker.is_sparse(row):  # cannot happen (nothing between the fetch and
                whole = self.row_slots(row, n)  # here changes the tracker); a rebuild would need the whole row
                rs = row_slots[b] = RowSlots(whole, whole)
            if self.tracker.update(row, rs.tail, n, block=cfg.page_size, offset=rs.start):
                sparse.append(b)
            rs.indexed = self.tracker.indexed_slots(row)  # its Insert of this step included
        if sparse and cfg.dense_while_indexing:  # a sequence whose index is being written attends to every token
            firsts = self.selector.first_indexes_pending()  # this step's first indexes included
            behind = None if behind is None or firsts is None else behind | firsts
            layers, n_pages = list(self.store_layer.values()), self._n_pages(rows, sparse, cfg)
            if cfg.max_stale_steps > 0 and behind is not None:
                # asynchronous selection tolerates unanswered Inserts, but not before a sequence's first
                # selections: those would queue behind every write of the sequence still queued (the
                # Inserts sent while its index was built: time-outs and fallbacks at the switch to sparse)
                if not all(self.cache.selected_at(self.tracker.seq_of(rows[b]), layers, n_pages) for b in sparse):
                    self.cache.collect_arrived()  # answers already in count as selections
                writing = self.selector.writes_pending()  # this step's Inserts included
                behind = None if writing is None else behind | (writing - self.cache.selected_seqs())
            held = {b for b in sparse if behind is None or self.tracker.seq_of(rows[b]) in behind}
            if cfg.max_stale_steps > 0 and behind is not None:
                # a sequence without selections yet attends densely while this step's anchor layers fetch
                # its first ones, not waited for (a first sparse step waited for every layer's answer in
                # turn, behind the other requests' queries: on the H100 at batch 8, until its deadline); it
                # goes sparse once every anchor layer has a selection, or after PRIME_STEPS such steps
                for b in sparse:
                    seq = self.tracker.seq_of(rows[b])
                    if b in held:
                        continue
                    if self.cache.selected_at(seq, layers, n_pages):
                        self._priming_steps.pop(seq, None)
                    elif self._priming_steps.get(seq, 0) < PRIME_STEPS:
                        self._priming_steps[seq] = self._priming_steps.get(seq, 0) + 1
                        primed.append(b)
            if held or primed:
                self.metrics.dense_while_indexing_rows += len(held) + len(primed)
                sparse = [b for b in sparse if b not in held and b not in primed]
            if held and not sparse:  # the whole step waits on the indexer: keep its stuck detection going
                self.selector.behind(cfg.selection_deadline_ms / 1e3,
                                     self.selector.pending_tokens({self.tracker.seq_of(rows[b]) for b in held}))
        self.metrics.dense_rows += len(rows) - len(sparse)
        if primed:
            self.metrics.primed_rows += len(primed)
            self.priming = PrimeStep(np.asarray(primed, np.int64), [self.tracker.seq_of(rows[b]) for b in primed],
                                     self._n_pages(rows, primed, cfg),
                                     self.selector.begin_step(cfg.selection_deadline_ms / 1e3, 0, wait_writes=False))
        if not sparse and self.device_pool is None:  # offload: every decode reads the device pool
            return None
        selection, n_pages = None, 1
        if sparse:
            seqs = {self.tracker.seq_of(rows[b]) for b in sparse}
            selection = self.selector.begin_step(cfg.selection_deadline_ms / 1e3, self.selector.pending_tokens(seqs),
                                                 wait_writes=cfg.max_stale_steps == 0, seqs=seqs)
            n_pages = self._n_pages(rows, sparse, cfg)
        sp = np.asarray(sparse, np.int64)
        step = DecodeStep(np.asarray(rows), np.asarray(lens), sp, [self.tracker.seq_of(rows[b]) for b in sp],
                          self._fixed_slots(rows, row_slots, set(sparse), cfg.sink_tokens), n_pages, selection,
                          row_slots=row_slots)
        if self.device_pool is not None:
            step.lanes = self.device_pool.lanes_for(rows)
        self.metrics.sparse_rows += len(sp)
        return step

    def _n_pages(self, rows, entries, cfg: IceCacheConfig) -> int:
        """Pages per KV head asked for the batch ``entries``: the budget's (times ``token_rerank``), at most the
        longest index's tokens."""
        return max(1, min(cfg.candidate_pages, max(self.tracker.live[rows[b]].n for b in entries)))

    def _fixed_slots(self, rows, all_slots: list[RowSlots], sparse: set[int], sink: int
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The part of each request's plan that every anchor layer of the step shares: the sink and the
        unindexed tail around the selected pages (sparse requests), or every token (requests within the
        budget, or dense while their index is written or their first selections fetched)."""
        out = []
        for b, (row, rs) in enumerate(zip(rows, all_slots)):
            if b in sparse:
                out.append((rs.head[:sink], rs.since(self.tracker.indexed_end(row))))
            else:
                every = rs.since(0)
                out.append((every, every[:0]))
        return out

    # ------------------------------------------------------------------ once per anchor layer
    def plan(self, step: DecodeStep, anchor: int, q3: torch.Tensor, cfg: IceCacheConfig, query_params,
             keys: torch.Tensor | None = None, scale: float = 1.0) -> DecodePlan:
        """Per (request, KV head): the fixed slots plus this anchor layer's selected pages (with ``token_rerank``,
        the budget's best tokens among them by ``q3``, scored against the layer's K plane ``keys``)."""
        H = self.H
        picked, tails = {}, {}
        if len(step.sparse):
            if step.sparse_index is None or step.sparse_index.device != q3.device:  # once per step
                step.sparse_index = to_device(step.sparse, q3.device)
            hq = self.host_query(q3[step.sparse_index])  # on a GPU, copied without waiting
            query = self._query_args(cfg, query_params)
            if cfg.reuses_selections:  # a selection of an earlier step attends to every token indexed since
                ends = [self.tracker.indexed_end(int(step.rows[b])) for b in step.sparse]
                chosen = self.cache.choose(step.selection, self.store_layer[anchor], step.seqs, ends, hq,
                                           step.n_pages, step_reuse=cfg.step_reuse, max_stale=cfg.max_stale_steps,
                                           deadline_s=cfg.selection_deadline_ms / 1e3, **query)
                for (pages, end), b in zip(chosen, step.sparse):
                    picked[int(b)] = pages
                    tails[int(b)] = step.row_slots[b].since(end)
            else:
                sel = self.selector.select(step.selection, self.store_layer[anchor], step.seqs, hq.array(),
                                           hq.q_dtype, step.n_pages, **query)
                picked = {int(b): sel.slots[j].reshape(H, -1) for j, b in enumerate(step.sparse)}
        self.prime(anchor, q3, cfg, query_params)
        fixed = [(a, tails.get(b, z)) for b, (a, z) in enumerate(step.fixed)]
        compact_only = not self.plan_slots and self.device_pool is None  # FlashInfer reads the compact form only
        reranked = None
        if picked and cfg.token_rerank > 1:
            if keys is None:
                raise ValueError("token_rerank needs the anchor layer's K plane to rank the candidates' tokens")
            if compact_only:  # the kept tokens stay where they are ranked: laid into the plan's rows there
                reranked = self._rerank_into_rows(step, picked, q3, keys, cfg.n_pages * cfg.page_size, scale)
                picked = reranked.placeholders
                kept = int(reranked.counts.sum())
            else:
                picked = self._rerank(step, picked, q3, keys, cfg.n_pages * cfg.page_size, scale)
                kept = sum(int((p >= 0).sum()) for p in picked.values())
            step.selection.pages += kept // cfg.page_size  # the kept tokens in pages' worth (they need not share pages)
        elif picked:
            step.selection.pages += sum(int((p.reshape(H, -1, cfg.page_size)[..., 0] >= 0).sum())
                                        for p in picked.values())
        if compact_only:
            tokens, indptr, rows = compact_layout(fixed, picked, H, step.dense_rows)
            rows = to_device(rows, self.slots_device)
            if reranked is not None:
                reranked.fill(rows, indptr, fixed, H)
            plan = step.plans[anchor] = DecodePlan(None, None, indptr=host_for(indptr, self.slots_device),
                                                   rows=rows, tokens=torch.from_numpy(tokens))
            return plan
        slots, valid = full_layout(fixed, picked, H)
        dev = self.slots_device
        if self.device_pool is not None:  # host slots -> the device rows holding them (misses loaded per layer)
            slots, misses = self.device_pool.map_plan(anchor, step.lanes, slots, valid)
            step.misses[anchor] = misses
            layers = self.layers_per_anchor[anchor]
            self.metrics.device_rows_hit += (int(valid.sum()) - len(misses[0])) * layers
            self.metrics.device_rows_loaded += len(misses[0]) * layers
            step.rows_loaded += len(misses[0]) * layers
            dev = self.device_pool.device
        slots[~valid] = 0
        tokens, indptr, rows = compact_of(slots, valid, H)
        on = dev if self.plan_slots else "cpu"
        plan = step.plans[anchor] = DecodePlan(to_device(slots, on), to_device(valid, on),
                                               indptr=host_for(indptr, dev), rows=to_device(rows, dev),
                                               tokens=torch.from_numpy(tokens))
        return plan

    def _ranked(self, step: DecodeStep, picked: dict[int, np.ndarray], q3: torch.Tensor, keys: torch.Tensor,
                keep: int, scale: float) -> tuple[list[int], np.ndarray, torch.Tensor]:
        """The step's sparse requests ``order``, their candidate slots ``cand [S, H, W]`` (int64, -1 padded, on the
        host) and the ``keep`` best of each by this step's queries (``rerank.py``), computed where the K plane is
        and left there: ``[S, H, min(keep, W)]``, the valid ones first."""
        order = [int(b) for b in step.sparse]
        W = max(picked[b].shape[1] for b in order)
        cand = np.full((len(order), self.H, W), -1, np.int64)
        for j, b in enumerate(order):
            cand[j, :, :picked[b].shape[1]] = picked[b]
        q = q3[step.sparse_index].to(keys.device)  # the rows ``plan`` gathered its queries with, on the device
        self.metrics.reranked_selections += len(order)
        return order, cand, rerank_tokens(q, keys, to_device(cand, keys.device), keep, scale)

    def _rerank(self, step: DecodeStep, picked: dict[int, np.ndarray], q3: torch.Tensor, keys: torch.Tensor,
                keep: int, scale: float) -> dict[int, np.ndarray]:
        """The ``keep`` best tokens of each request's candidate pages (``_ranked``), back on the host, where the
        plans that need them are laid out (the full layout, the device pool's lane map). ``picked`` holds every
        sparse request of the step, in its order."""
        order, _, kept = self._ranked(step, picked, q3, keys, keep, scale)
        kept = kept.cpu().numpy()
        return {b: kept[j] for j, b in enumerate(order)}

    def _rerank_into_rows(self, step: DecodeStep, picked: dict[int, np.ndarray], q3: torch.Tensor,
                          keys: torch.Tensor, keep: int, scale: float) -> ReRanked:
        """``_rerank`` for a plan in the compact form only: the kept tokens stay on the K plane's device and are
        written into the plan's rows there (``ReRanked.fill``), so on a GPU nothing is read back per anchor
        layer. How many each (request, KV head) keeps is known on the host: every valid candidate up to
        ``keep`` (``rerank_tokens`` puts the valid ones first)."""
        order, cand, kept = self._ranked(step, picked, q3, keys, keep, scale)
        counts = np.minimum((cand >= 0).sum(-1), kept.shape[2])  # [S, H]
        take = np.arange(kept.shape[2])[None, None, :] < counts[..., None]  # [S, H, width]: the kept tokens' places
        placeholders = {b: np.where(take[j], 0, -1) for j, b in enumerate(order)}  # laid out as slot 0
        return ReRanked(order, kept, counts, take, placeholders)

    def new_turn(self, row: int) -> None:
        """``row``'s index took a new turn's prompt (a streaming session's next turn on the same row): the
        selections made for its context before are not reused (``SelectionCache.forget``)."""
        st = self.tracker.live.get(row)
        if st is not None:
            self.cache.forget(st.seq)
            self._priming_steps.pop(st.seq, None)

    def prime(self, anchor: int, q3: torch.Tensor, cfg: IceCacheConfig, query_params) -> None:
        """At an anchor layer, send the queries of the rows fetching their first selections (``priming``),
        without waiting. Called from ``plan`` and, when no row of the step is sparse, from the backend's
        dense path."""
        p = self.priming
        if p is None or anchor not in self.store_layer:
            return
        if p.q_index is None or p.q_index.device != q3.device:  # once per step
            p.q_index = to_device(p.index, q3.device)
        self.cache.prime(p.selection, self.store_layer[anchor], p.seqs, self.host_query(q3[p.q_index]), p.n_pages,
                         max_stale=cfg.max_stale_steps, deadline_s=cfg.selection_deadline_ms / 1e3,
                         **self._query_args(cfg, query_params))

    @staticmethod
    def _query_args(cfg: IceCacheConfig, qp) -> dict:
        return dict(policy=cfg.selection, merge=cfg.gqa_merge, fov=qp.fov, prop_to_retrieve=qp.prop_to_retrieve,
                    num_to_retrieve=qp.num_to_retrieve)


def fetch_slots(req_to_token: torch.Tensor, ranges: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """The KV slots ``req_to_token[row, a:b]`` of each ``(row, a, b)``: views on CPU; from a GPU, one
    gather and one copy to the host for all of them (a copy per row was a stream sync each)."""
    if req_to_token.device.type == "cpu":
        return [req_to_token[row, a:b].numpy() for row, a, b in ranges]
    if not ranges:
        return []
    flat = torch.cat([req_to_token[row, a:b] for row, a, b in ranges]).cpu().numpy()
    return np.split(flat, np.cumsum([b - a for _, a, b in ranges])[:-1])


@dataclass
class ReRanked:
    """Re-ranked tokens still on the device (``Planner._rerank_into_rows``): ``kept [S, H, W]`` slots of the
    step's sparse requests ``order`` (valid ones first), ``counts [S, H]`` valid per (request, KV head),
    ``take [S, H, W]`` those places, and the ``placeholders`` a host layout reserves their rows with."""

    order: list[int]
    kept: torch.Tensor
    counts: np.ndarray
    take: np.ndarray
    placeholders: dict[int, np.ndarray]

    def fill(self, rows: torch.Tensor, indptr: np.ndarray, fixed: list[tuple[np.ndarray, np.ndarray]], H: int) -> None:
        """Write the kept tokens' rows (``slot * H + h``) into ``rows`` (a compact layout over ``placeholders``,
        ``indptr`` its host offsets) where their placeholders are: after each (request, KV head)'s valid slots
        before the selection. Index tensors go to ``rows``' device without waiting; no value is read back."""
        if not self.order:
            return
        before = np.array([int((np.asarray(fixed[b][0]) >= 0).sum()) for b in self.order], np.int64)
        starts = indptr[:-1].reshape(len(fixed), H)[self.order] + before[:, None]  # [S, H]
        width = self.take.shape[2]
        dst = (starts[..., None] + np.arange(width)[None, None, :])[self.take]
        src = np.flatnonzero(self.take)
        heads = torch.arange(H, device=self.kept.device).view(1, H, 1)
        vals = (self.kept * H + heads).reshape(-1)[to_device(src, self.kept.device)]
        rows[to_device(dst, rows.device)] = vals.to(device=rows.device, dtype=rows.dtype)


def full_layout(fixed: list[tuple[np.ndarray, np.ndarray]], picked: dict[int, np.ndarray], H: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """A plan's ``slots [B, H, T]`` (int64, -1 where nothing is attended) and ``valid``: per request, its
    slots before the selected pages, the selected pages (``picked[b] [H, W]``, -1 padded) and its slots
    after them (``fixed[b]``); a request without a selection attends to ``fixed[b]`` only."""
    B = len(fixed)
    width = [len(a) + len(z) + (picked[b].shape[1] if b in picked else 0) for b, (a, z) in enumerate(fixed)]
    slots = np.full((B, H, max(width)), -1, np.int64)
    for b, (before, after) in enumerate(fixed):
        slots[b, :, : len(before)] = before
        at = len(before)
        if b in picked:
            slots[b, :, at: at + picked[b].shape[1]] = picked[b]
            at += picked[b].shape[1]
        slots[b, :, at: at + len(after)] = after
    return slots, slots >= 0


def offsets(tokens: np.ndarray) -> np.ndarray:
    """``indptr [B*H + 1]`` int32 of per-(request, KV head) counts ``tokens [B, H]``."""
    indptr = np.zeros(tokens.size + 1, np.int32)
    np.cumsum(tokens.reshape(-1), out=indptr[1:])
    return indptr


def compact_of(slots: np.ndarray, valid: np.ndarray, H: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The compact form of a full layout: ``tokens [B, H]``, ``indptr`` and ``rows`` (``slot * H + h`` of the
    valid entries, in order, int32)."""
    tokens = valid.sum(-1)
    rows = (slots * H + np.arange(H, dtype=np.int64)[None, :, None])[valid].astype(np.int32)
    return tokens, offsets(tokens), rows


def compact_layout(fixed: list[tuple[np.ndarray, np.ndarray]], picked: dict[int, np.ndarray], H: int,
                   dense_rows: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A plan in the compact form only (``tokens [B, H]``, ``indptr [B*H + 1]`` int32, ``rows`` int32:
    ``slot * H + h`` per (request, KV head), in order), equal to what ``Planner.plan`` derives from the full
    ``slots`` / ``valid`` layout, without making it: per request, its slots before the selected pages, the
    selected pages' valid slots (``picked[b] [H, W]``, -1 padded) and its slots after them (``fixed[b]``).
    The requests with a selection are laid out together (one small ``full_layout``); a request with none
    (within the budget, or dense while its index is built) attends to every token: its rows are the same at
    every anchor layer of the step, made once into ``dense_rows`` (a 128k-token row is 1M rows per layer;
    laid out per layer, a step with such rows beside sparse ones spent most of its host time here)."""
    B = len(fixed)
    tokens = np.empty((B, H), np.int64)
    heads = np.arange(H, dtype=np.int64)
    sel = [b for b in range(B) if b in picked]
    sparse_parts: list[np.ndarray] = []
    if sel:
        sel_tokens, indptr, flat = compact_of(*full_layout([fixed[b] for b in sel],
                                                           {i: picked[b] for i, b in enumerate(sel)}, H), H)
        if len(sel) == B:  # no request attends to every token: already in order
            return sel_tokens, indptr, flat
        tokens[sel] = sel_tokens
        sparse_parts = np.split(flat, np.cumsum(tokens[sel].sum(1))[:-1])
    parts, k = [], 0
    for b, (before, after) in enumerate(fixed):
        if b in picked:
            parts.append(sparse_parts[k])
            k += 1
            continue
        r = dense_rows.get(b)  # every token, every head (the planner's such rows have no ``after``)
        if r is None:
            both = np.concatenate([np.asarray(before, np.int64), np.asarray(after, np.int64)])
            r = dense_rows[b] = (both[None, :] * H + heads[:, None]).reshape(-1).astype(np.int32)
        tokens[b] = len(before) + len(after)
        parts.append(r)
    rows = np.concatenate(parts) if parts else np.empty(0, np.int32)
    return tokens, offsets(tokens), rows
