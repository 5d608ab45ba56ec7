"""The ``icecache`` attention backend: dense prefill, sparse decode over sink + selected pages + recent tokens.

One instance per TP rank (in SGLang's scheduler process). It owns the rank's indexer (process, key store,
client) and a :class:`SequenceTracker`. Per forward pass:

- **extend (prefill chunk)**: dense attention of the new tokens over their prefix (``attention/extend.py``:
  SGLang's torch_native math without its re-prefill of a cached prefix); each anchor layer's keys are
  also written to the key store at their KV slots; after the last layer, every request longer than the
  budget is indexed up to its recent window (a prefix hit first takes the cached prefix's index).
- **decode**: ``init_forward_metadata`` brings each request's index up to date (window's oldest tokens,
  in page-size blocks). At each anchor layer, one indexer query selects ``n_pages`` pages per KV head for
  every sparse request; the plan (sink + those pages' slots + the tokens after the indexed range) serves
  that layer and the ``layer_reuse - 1`` layers after it. Requests within the budget, and the first
  ``dense_layers`` layers, attend to everything.

If the indexer does not answer by the selection deadline, the client's fallback (most recent indexed
pages) is used and counted; a dead indexer is restarted (at most ``MAX_RESTARTS`` in ``RESTART_WINDOW_S``).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ..indexer.client import (
    IndexerClient,
    IndexerError,
    IndexerTimeout,
    IndexerUnavailable,
    Selection,
)
from ..indexer.launcher import Indexer
from . import events
from .attention import DecodePlan, SparseDecodeAttention, decode_attention_for
from .attention.extend import extend_attention
from .config import IceCacheConfig, IceCacheConfigError
from .control import control_path, read_control
from .metrics import IceCacheMetrics, PrometheusExport, snapshot_path, write_snapshot
from .sequences import SequenceTracker

logger = logging.getLogger(__name__)

KEY_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0
SNAPSHOT_EVERY_S = 0.5
LOG_EVERY_STEPS = 40
#: how long indexing one token of one KV head of one layer may take before a decode step stops waiting for
#: it (a 128k-token build of 8 heads takes ~14 s on 2 cores: ~14 us per token-head; twice that, here)
BUILD_S_PER_TOKEN_HEAD = 30e-6


@dataclass
class _Step:
    """Decode-step state shared by the layers of one forward pass."""

    rows: np.ndarray  # req_to_token row per batch entry
    lens: np.ndarray  # sequence length per batch entry (including the token being decoded)
    sparse: np.ndarray  # batch entries decoded sparsely
    seqs: list[int]
    fixed: list[tuple[np.ndarray, np.ndarray]]  # per batch entry: (slots before, slots after) the selected pages
    plans: dict[int, DecodePlan] = field(default_factory=dict)  # anchor layer -> plan
    selection_s: float = 0.0
    pages: int = 0


class _RowEvents:
    """Attached to SGLang's ReqToTokenPool (``attach_aux_cache``): row lifecycle -> tracker."""

    def __init__(self, backend: IceCacheAttnBackend, capacity: int):
        self.backend = backend
        self.dense_capacity = capacity  # IceCache does not change how many tokens SGLang may schedule

    def alloc_to_lengths(self, **_kw) -> None:
        pass

    def free(self, row: int) -> None:
        self.backend.tracker.row_freed(int(row))

    def clear(self) -> None:
        self.backend.tracker.clear()

    def reset_allocator(self) -> None:
        pass


class IceCacheAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner, config: IceCacheConfig | None = None, attention: SparseDecodeAttention | None = None):
        super().__init__(model_runner)
        cfg = config or IceCacheConfig.from_env() or IceCacheConfig()
        self.cfg = cfg
        pool = self.token_to_kv_pool
        if getattr(model_runner, "use_mla_backend", False):
            raise IceCacheConfigError("--enable-icecache supports multi-head / grouped-query attention models, not MLA")
        if pool.dtype not in KEY_DTYPES:
            raise IceCacheConfigError(f"--enable-icecache needs a float32/float16/bfloat16 KV cache, got {pool.dtype}")
        self.num_layers = pool.layer_num
        self.H, self.d = pool.head_num, pool.head_dim
        self.v_d = getattr(pool, "v_head_dim", pool.head_dim)
        if cfg.dense_layers >= self.num_layers:
            raise IceCacheConfigError(f"dense_layers ({cfg.dense_layers}) leaves none of the model's "
                                      f"{self.num_layers} layers sparse")
        self.anchors = [layer for layer in range(cfg.dense_layers, self.num_layers)
                        if (layer - cfg.dense_layers) % cfg.layer_reuse == 0]
        self.store_layer = {a: i for i, a in enumerate(self.anchors)}
        self._layers_per_anchor = {a: min(cfg.layer_reuse, self.num_layers - a) for a in self.anchors}
        self.anchor_of = {layer: self.anchors[(layer - cfg.dense_layers) // cfg.layer_reuse]
                          for layer in range(cfg.dense_layers, self.num_layers)}
        self.num_slots = pool.size + pool.page_size
        from sglang.srt.runtime_context import get_parallel

        rank = get_parallel().tp_rank
        self.indexer = Indexer.launch(num_layers=len(self.anchors), num_kv_heads=self.H, head_dim=self.d,
                                      num_slots=self.num_slots, rank=rank, key_dtype=KEY_DTYPES[pool.dtype],
                                      index=cfg.index_config(), threads=cfg.indexer_threads,
                                      timeout_s=cfg.selection_deadline_ms / 1e3)
        self.tracker = SequenceTracker(self.indexer.client, list(range(len(self.anchors))), self.num_slots,
                                       sink=cfg.sink_tokens, window=cfg.window_tokens, budget=cfg.budget_tokens,
                                       block=cfg.page_size)
        self.attention = attention or decode_attention_for(cfg.decode_attention, pool.device)
        self.query_params = cfg.query_params()
        self.metrics = IceCacheMetrics(rank=rank)
        self.prometheus = PrometheusExport(rank)
        elem = pool.dtype.itemsize
        self.metrics.host_kv_bytes = self.num_slots * self.num_layers * self.H * (self.d + self.v_d) * elem
        self.metrics.key_store_bytes = self.indexer.store.keys.nbytes
        self._token_kv_bytes = self.H * (self.d + self.v_d) * elem  # one token, one layer
        self._restarts: deque[float] = deque()
        self._step: _Step | None = None
        self._acked_tokens = 0  # tracker.counters.indexed_tokens the indexer had acknowledged at the last step
        self.last_layer = self.num_layers - 1
        self.req_to_token_pool.attach_aux_cache(_RowEvents(self, pool.size))
        events.subscribe(self.tracker.slots_freed, self.tracker.clear)
        self.config_version = 0
        self._control_path, self._control_mtime = control_path(), None
        self._closed = threading.Event()
        threading.Thread(target=self._publisher, name="icecache-stats", daemon=True).start()
        atexit.register(self.close)
        logger.info("IceCache on rank %d: %s; %d anchor layers of %d, decode attention %s, indexer pid %s, "
                    "key store %s", rank, cfg.to_json(), len(self.anchors), self.num_layers,
                    type(self.attention).__name__, self.indexer.process.pid,
                    self.indexer.store.spec.path)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._closed.set()
        events.unsubscribe(self.tracker.slots_freed, self.tracker.clear)
        snapshot_path(self.metrics.rank).unlink(missing_ok=True)  # a later server on this port starts clean
        try:
            self.indexer.close()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            logger.info("IceCache indexer close: %s", e)

    def _ensure_indexer(self) -> None:
        if self.indexer.process.is_alive():
            return
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= MAX_RESTARTS:
            return  # crash loop: keep serving on fallback selections
        self._restarts.append(now)
        logger.warning("IceCache indexer (rank %d) is dead: restarting (%d in the last %.0f s)",
                       self.metrics.rank, len(self._restarts), RESTART_WINDOW_S)
        try:
            self.indexer.restart()
            self.metrics.indexer_restarts += 1
        except Exception:
            logger.exception("IceCache indexer restart failed; decoding continues on fallback selections")

    # ------------------------------------------------------------------ keys -> key store
    def _store_keys(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor | None) -> None:
        i = self.store_layer.get(layer_id)
        if i is None or k is None or loc is None or loc.numel() == 0:
            return
        k = k.detach().reshape(-1, self.H, self.d)
        if k.dtype == torch.bfloat16:
            k = k.view(torch.int16)
        self.indexer.store.write(i, loc.detach().cpu().numpy(), k.cpu().numpy())

    # ------------------------------------------------------------------ SGLang backend interface
    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self._step = None
        self._check_control()  # POST /icecache/config: applied between two forward passes
        mode = forward_batch.forward_mode
        if not mode.is_decode() or forward_batch.batch_size == 0:
            return
        self._ensure_indexer()
        rows, lens = self._rows_and_lens(forward_batch)
        sparse = []
        for b, (row, n) in enumerate(zip(rows, lens)):
            if n <= self.cfg.budget_tokens and not self.tracker.is_sparse(row):
                continue
            if self.tracker.update(row, self._row_slots(row, n), n, block=self.cfg.page_size):
                sparse.append(b)
        if sparse:
            self._await_writes()
            sp = np.asarray(sparse)
            self._step = _Step(np.asarray(rows), np.asarray(lens), sp, [self.tracker.seq_of(rows[b]) for b in sp],
                               self._fixed_slots(rows, lens, set(sparse)))
            self.metrics.sparse_rows += len(sp)
        self.metrics.dense_rows += len(rows) - len(sparse)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        if save_kv_cache and not layer.is_cross_attention:
            self._store_keys(layer.layer_id, forward_batch.out_cache_loc, k)
        if layer.layer_id == self.last_layer:
            self._after_extend(forward_batch)
        return o

    def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None,
                                 enable_gqa=False, causal=False, is_cross_attn=False, sliding_window_size=None):
        """Causal self-attention computes only the new tokens' rows (``attention/extend.py``): a prefix hit
        costs its new tokens, not a second prefill of the prefix. Anything else: SGLang's own."""
        if not causal or is_cross_attn or encoder_lens is not None or sliding_window_size is not None:
            return super()._run_sdpa_forward_extend(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens,
                extend_seq_lens, encoder_lens, scaling, enable_gqa, causal, is_cross_attn, sliding_window_size)
        return extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                extend_prefix_lens, extend_seq_lens, scaling, enable_gqa)

    def _after_extend(self, forward_batch) -> None:
        self._ensure_indexer()
        for row, n in zip(*self._rows_and_lens(forward_batch)):
            if n > self.cfg.budget_tokens or self.tracker.is_sparse(row):
                self.tracker.update(row, self._row_slots(row, n), n, verify=True)

    @staticmethod
    def _rows_and_lens(forward_batch) -> tuple[list[int], list[int]]:
        """``req_to_token`` row and sequence length of each batch entry, as Python ints."""
        lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
        return forward_batch.req_pool_indices.cpu().tolist(), lens.cpu().tolist()

    def _row_slots(self, row: int, n: int) -> np.ndarray:
        """KV slots of positions ``[0, n)`` of ``row`` (a view on CPU)."""
        return self.req_to_token_pool.req_to_token[row, :n].cpu().numpy()

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        step = self._step
        lid = layer.layer_id
        if step is None or lid < self.cfg.dense_layers or layer.is_cross_attention:
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            if save_kv_cache:
                self._store_keys(lid, forward_batch.out_cache_loc, k)
            return o
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
            self._store_keys(lid, forward_batch.out_cache_loc, k)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        anchor = self.anchor_of[lid]
        plan = step.plans.get(anchor)
        if plan is None:
            plan = step.plans[anchor] = self._plan(step, anchor, q3)
        o = self.attention.decode(q3, self.token_to_kv_pool.get_key_buffer(lid),
                                  self.token_to_kv_pool.get_value_buffer(lid), plan, layer.scaling)
        if lid == self.last_layer:
            self._finish_step(step)
        return o.reshape(q3.shape[0], layer.tp_q_head_num * layer.v_head_dim)

    # ------------------------------------------------------------------ selection -> plan
    def _await_writes(self) -> None:
        """Before a step's first query, let the indexer finish the builds and inserts sent since the last
        step (they are queued ahead of the query anyway), with a deadline that scales with their size, so
        a long prefill's build does not turn the first decode steps into fallbacks."""
        client = self.indexer.client
        if not client.pending_writes():
            self._acked_tokens = self.tracker.counters.indexed_tokens
            return
        pending = self.tracker.counters.indexed_tokens - self._acked_tokens
        allowance = self.cfg.selection_deadline_ms / 1e3 + pending * self.H * len(self.anchors) * BUILD_S_PER_TOKEN_HEAD
        try:
            client.sync(timeout_s=allowance)
        except (IndexerTimeout, IndexerUnavailable) as e:
            logger.warning("IceCache: indexing not finished before decode (%s); selections may fall back", e)
        except IndexerError as e:
            logger.error("IceCache: an indexing request failed: %s", e)
        self._acked_tokens = self.tracker.counters.indexed_tokens

    def _select(self, step: _Step, anchor: int, q3: torch.Tensor) -> Selection:
        qs = q3[torch.from_numpy(step.sparse).to(q3.device)].detach()
        if qs.dtype == torch.bfloat16:
            arr, q_dtype = qs.view(torch.int16).cpu().numpy().view(np.uint16), "bfloat16"
        else:
            arr, q_dtype = qs.to(torch.float32).cpu().numpy(), None
        client, limit = self.indexer.client, self.indexer.config.max_batch
        t0 = time.perf_counter()
        rids = [client.query_async(self.store_layer[anchor], step.seqs[i: i + limit], arr[i: i + limit],
                                   self.cfg.n_pages, fov=self.query_params.fov,
                                   prop_to_retrieve=self.query_params.prop_to_retrieve,
                                   num_to_retrieve=self.query_params.num_to_retrieve, q_dtype=q_dtype,
                                   policy=self.cfg.selection)
                for i in range(0, len(step.seqs), limit)]  # an indexer query carries at most max_batch rows
        parts = [client.query_result(rid) for rid in rids]
        step.selection_s += time.perf_counter() - t0
        self.metrics.queries += len(parts)
        self.metrics.fallbacks += sum(p.fallback for p in parts)
        sel = parts[0] if len(parts) == 1 else Selection(
            np.concatenate([p.pages for p in parts]), np.concatenate([p.slots for p in parts]),
            [n for p in parts for n in p.n_tokens], any(p.fallback for p in parts),
            "; ".join(p.reason for p in parts if p.reason), sum(p.search_us for p in parts))
        step.pages += int((sel.slots[..., 0] >= 0).sum())
        return sel

    def _fixed_slots(self, rows, lens, sparse: set[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The part of each request's plan that every anchor layer of the step shares: the sink and the
        unindexed tail around the selected pages (sparse requests), or every token (requests within the
        budget)."""
        sink = self.cfg.sink_tokens
        out = []
        for b, (row, n) in enumerate(zip(rows, lens)):
            row_slots = self._row_slots(row, n).astype(np.int64)
            if b in sparse:
                out.append((row_slots[:sink], row_slots[self.tracker.indexed_end(row):]))
            else:
                out.append((row_slots, row_slots[:0]))
        return out

    def _plan(self, step: _Step, anchor: int, q3: torch.Tensor) -> DecodePlan:
        """Per (request, KV head): the fixed slots plus this anchor layer's selected pages."""
        sel = self._select(step, anchor, q3)
        B, H = len(step.rows), self.H
        picked = {int(b): sel.slots[j].reshape(H, -1) for j, b in enumerate(step.sparse)}
        width = [len(a) + len(z) + (picked[b].shape[1] if b in picked else 0) for b, (a, z) in enumerate(step.fixed)]
        slots = np.full((B, H, max(width)), -1, np.int64)
        for b, (before, after) in enumerate(step.fixed):
            slots[b, :, : len(before)] = before
            at = len(before)
            if b in picked:
                slots[b, :, at: at + picked[b].shape[1]] = picked[b]
                at += picked[b].shape[1]
            slots[b, :, at: at + len(after)] = after
        valid = slots >= 0
        slots[~valid] = 0
        dev = self.token_to_kv_pool.get_key_buffer(anchor).device
        return DecodePlan(torch.from_numpy(slots).to(dev), torch.from_numpy(valid).to(dev))

    def _finish_step(self, step: _Step) -> None:
        m = self.metrics
        m.decode_steps += 1
        m.selection_s_last = step.selection_s
        m.selection_s_total += step.selection_s
        m.pages_selected_total += step.pages
        n_sel = max(len(step.sparse) * self.H * len(self.anchors), 1)
        m.pages_per_step_last = step.pages / n_sel
        # tokens attended per request over all layers: each anchor's plan counts once per layer it serves
        toks = sum(self._layers_per_anchor[a] * p.tokens_per_head.max(dim=1).values for a, p in step.plans.items())
        toks = toks[torch.from_numpy(step.sparse).to(toks.device)].cpu()
        toks += self.cfg.dense_layers * torch.from_numpy(step.lens[step.sparse])
        m.device_kv_bytes_last = int(toks.max()) * self._token_kv_bytes
        m.device_kv_bytes_max = max(m.device_kv_bytes_max, m.device_kv_bytes_last)
        if m.decode_steps % LOG_EVERY_STEPS == 0:  # beside SGLang's "Decode batch" line, same cadence
            m.live_seqs, m.retained_seqs = len(self.tracker.live), len(self.tracker.retained)
            logger.info(m.log_line())

    def _check_control(self) -> None:
        """Apply settings posted to ``/icecache/config`` since the last forward pass (one ``stat`` when none
        were: the file is written before the HTTP reply, so the next request runs with them)."""
        try:
            mtime = self._control_path.stat().st_mtime_ns
        except OSError:
            return
        if mtime == self._control_mtime:
            return
        self._control_mtime = mtime
        got = read_control()
        if got is not None and got[0] > self.config_version:
            self._apply_config(*got)

    def _apply_config(self, version: int, cfg: IceCacheConfig) -> None:
        self.cfg = cfg
        self.tracker.budget = cfg.budget_tokens
        self.query_params = cfg.query_params()
        self.indexer.client.timeout_s = cfg.selection_deadline_ms / 1e3  # the client survives restarts
        self.config_version = version
        logger.info("IceCache: settings version %d: %s", version, cfg.to_json())

    def _publisher(self) -> None:
        """Refresh the rank's snapshot every SNAPSHOT_EVERY_S (a daemon thread: the scheduler never waits)."""
        while not self._closed.wait(SNAPSHOT_EVERY_S):
            try:
                self.publish()
            except Exception as e:  # noqa: BLE001 - dicts may change under us; the next round retries
                logger.debug("IceCache snapshot skipped: %s", e)

    def publish(self) -> dict:
        """Refresh the counters from the tracker and client and write the rank's snapshot."""
        m = self.metrics
        c = self.tracker.counters
        m.indexed_tokens, m.shared_tokens = c.indexed_tokens, c.shared_tokens
        m.live_seqs, m.retained_seqs = len(self.tracker.live), len(self.tracker.retained)
        extra = {"tracker": self.tracker.summary(), "pid": os.getpid(), "indexer_pid": self.indexer.process.pid,
                 "selection": self.cfg.selection, "budget_tokens": self.cfg.budget_tokens,
                 "config_version": self.config_version, "deadline_s": self.indexer.client.timeout_s,
                 "indexer": self._indexer_stats()}
        write_snapshot(m, extra)
        snap = m.snapshot()
        self.prometheus.update(snap)
        return snap | extra

    def _indexer_stats(self) -> dict | None:
        """The indexer's own counters, over a socket of the publisher thread (the scheduler's client is not
        thread-safe)."""
        endpoint = self.indexer.config.endpoint
        c = getattr(self, "_stats_client", None)
        if c is None or c.endpoint != endpoint:
            if c is not None:
                c.close()
            c = self._stats_client = IndexerClient(endpoint, self.H, self.cfg.page_size, timeout_s=1.0)
        try:
            st = c.stats(timeout_s=1.0)
        except Exception:  # noqa: BLE001 - a dead or busy indexer: no figures this round
            return None
        return {f: getattr(st, f) for f in st.__struct_fields__}
