"""The ``icecache`` attention backend: dense prefill, sparse decode over sink + selected pages + recent tokens.

One instance per TP rank (in SGLang's scheduler process). It is SGLang's side of IceCache and delegates
each job to its own module:

| job | where |
|---|---|
| the rank's indexer: launch, health, restarts, stuck detection | ``supervisor.py`` (``IndexerSupervisor``) |
| prefill, dense layers, requests within the budget | ``dense.py`` (one of SGLang's backends, held as ``self.dense``) |
| which request has which index (rows, KV slots, prefix reuse) | ``sequences.py`` (``SequenceTracker``) |
| a decode step's queries under one deadline, fallbacks | ``selection.py`` (``Selector``) |
| selections reused across steps (``step_reuse``, asynchronous ``max_stale_steps``) | ``selection_cache.py`` (``SelectionCache``) |
| a step's plans: sink + selected pages + tail per (request, KV head) | ``plan.py`` (``Planner``, ``DecodeStep``) |
| the sparse attention over a plan | ``attention/`` (``SparseDecodeAttention`` over a ``DecodePlan``) |
| KV memory: SGLang's pool (keys shared with the indexer; host memory with offload), the offloaded decode's device pool, prefill's staging buffer | ``pool/`` |
| settings changed on a running server | ``control.py`` (files in the private ``rundir.py``) |
| figures: counters, snapshot thread, Prometheus | ``metrics.py``, ``publisher.py`` |

Per forward pass:

- **extend (prefill chunk)**: the dense backend's attention of the new tokens over their prefix (with
  offload over the batch's rows staged from the host pool onto the device, one layer at a time);
  each anchor layer's keys, as the KV pool holds them, are in the key store at their slots (the pool's K
  plane is the store in host memory; otherwise they are copied there);
  a request longer than the budget is indexed after its last chunk, in one Build up to its recent window
  (a row that already has an index is updated and checked for re-pointed tokens).
- **decode**: ``init_forward_metadata`` brings each request's index up to date (a request not indexed yet, in
  one Build, a prefix hit first taking the cached prefix's index; later steps add the window's oldest
  tokens in page-size blocks) and starts the
  step's selection (one deadline for the whole step), or, while the indexer is behind and
  ``while_indexing`` is dense, lets the step attend to every token. At each anchor layer, one indexer query selects pages per KV head for every sparse request; the plan (sink + those
  pages' slots + the tokens after the indexed range) serves that layer and the ``layer_reuse - 1`` layers
  after it. Requests within the budget, and the first ``dense_layers`` layers, attend to everything.
  With ``offload`` every plan names rows of the device pool, each layer copying its missed rows first.
- **decode under SGLang's breakable CUDA graphs** (``--cuda-graph-backend-decode breakable``): the same, with
  the pass begun by ``init_forward_metadata_out_graph`` for the real rows of SGLang's padded batch and each
  layer's attention an eager break between the captured segments (``_graph_attention``).

A fault in the indexer costs selection quality, never the scheduler: see ``supervisor.py``.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph import (eager_on_graph,
                                                                                is_in_breakable_cuda_graph)
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ..indexer.launcher import Indexer
from . import events
from .attention import SparseDecodeAttention, decode_attention_for
from .config import IceCacheConfig, IceCacheConfigError
from .control import ControlWatcher
from .dense import dense_backend_for, resolve_dense_attention
from .key_writes import KeyStoreWriter
from .metrics import IceCacheMetrics
from .pool import DeviceKVPool, shared_key_store
from .pool.staging import PrefillStaging, StagedPrefill, admission_deferrals, staging_rows
from ..indexer.launcher import INT8_RESCORE_FROM
from .pool.kv_pool import KEY_DTYPES
from .publisher import SnapshotPublisher
from .plan import DecodeStep, Planner
from .rundir import RunDir
from .selection import Selector
from .sequences import SequenceTracker
from .supervisor import IndexerSupervisor

logger = logging.getLogger(__name__)

LOG_EVERY_STEPS = 40


def model_problems(model_runner) -> list[str]:
    """Why this model cannot run with IceCache (empty when it can). The sparse path attends over every
    layer's full-attention KV pool: it would ignore a sliding window and index the wrong buffers of a
    hybrid (SWA or linear-attention) pool."""
    problems = []
    if getattr(model_runner, "use_mla_backend", False):
        problems.append("multi-head latent attention (MLA) models are not supported; IceCache indexes per-KV-head keys")
    if getattr(model_runner, "is_hybrid_swa", False):
        problems.append("hybrid sliding-window models (interleaved local and global layers) are not supported")
    elif getattr(model_runner, "sliding_window_size", None) is not None:
        problems.append(f"sliding-window attention (window {model_runner.sliding_window_size}) is not supported: "
                        "the sparse decode would attend beyond the window")
    try:
        from sglang.srt.configs.hybrid_arch import mambaish_config

        if mambaish_config(model_runner.model_config) is not None:
            problems.append("hybrid linear-attention / state-space models are not supported")
    except (ImportError, AttributeError):
        pass
    return problems


def offload_model_problems(model_runner) -> list[str]:
    """Why this model cannot keep its KV cache in host memory on a GPU (offload). Some models write their KV
    cache from their rotary kernel on CUDA with a bfloat16 cache (SGLang's ``enable_fused_set_kv_buffer``:
    Qwen3-MoE, GPT-OSS, ...), a kernel that accepts device memory only."""
    import sys

    module = sys.modules.get(type(getattr(model_runner, "model", None)).__module__)
    if module is not None and hasattr(module, "enable_fused_set_kv_buffer"):
        return [f"offload keeps the KV cache in host memory, but {type(model_runner.model).__name__} writes its KV "
                "cache from its rotary kernel (fused set_kv_buffer), which needs it on the GPU; run it without offload"]
    return []


class _RowEvents:
    """Attached to SGLang's ReqToTokenPool (``attach_aux_cache``): row lifecycle -> tracker. An error here
    is logged, never raised into SGLang's request bookkeeping (it would cost at most an index left behind)."""

    def __init__(self, backend: IceCacheAttnBackend, capacity: int):
        self.backend = backend
        self.dense_capacity = capacity  # IceCache does not change how many tokens SGLang may schedule

    def alloc_to_lengths(self, **_kw) -> None:
        pass

    def free(self, row: int) -> None:
        try:
            self.backend.tracker.row_freed(int(row))
        except Exception:
            logger.exception("IceCache: releasing row %s failed", row)
        if self.backend.device_pool is not None:
            self.backend.device_pool.release(int(row))

    def clear(self) -> None:
        try:
            self.backend.tracker.clear()
        except Exception:
            logger.exception("IceCache: clearing the tracker failed")
        if self.backend.device_pool is not None:
            self.backend.device_pool.clear()

    def reset_allocator(self) -> None:
        pass


@dataclass
class _GraphPass:
    """A decode graph's pass (capture or replay): its real requests, the first ``rows`` of its batch."""

    rows: int
    capture: bool


class IceCacheAttnBackend(AttentionBackend):
    def __init__(self, model_runner, config: IceCacheConfig | None = None, attention: SparseDecodeAttention | None = None):
        super().__init__()
        cfg = config or IceCacheConfig.from_env() or IceCacheConfig()
        self.launch_cfg = self.cfg = cfg
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = pool = model_runner.token_to_kv_pool
        problems = model_problems(model_runner)
        if pool.dtype not in KEY_DTYPES:
            problems.append(f"IceCache needs a float32/float16/bfloat16 KV cache, got {pool.dtype}")
        elif cfg.index.get("key_dtype") == "int8" and KEY_DTYPES[pool.dtype] not in INT8_RESCORE_FROM:
            problems.append(f"index key_dtype int8 rescores its exact selection from a float32 or bfloat16 key "
                            f"store; this KV cache is {KEY_DTYPES[pool.dtype]} (leave key_dtype unset)")
        if getattr(pool, "host_resident", False):
            problems += offload_model_problems(model_runner)
        try:
            self.dense_name = resolve_dense_attention(cfg.dense_attention, pool.device)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise IceCacheConfigError("--enable-icecache cannot serve this model: " + "; ".join(problems))
        # with offload no layer's full KV is on the device: prefill attends over a staging buffer the host
        # pool's rows are gathered into, one layer at a time (``pool/staging.py``)
        self.staging = None
        if cfg.offload:
            r2t = self.req_to_token_pool.req_to_token
            self.staging = PrefillStaging(pool, r2t, self.device, r2t.shape[0],
                                          staging_rows(cfg.prefill_staging_tokens, r2t.shape[1]))
        self._staged: StagedPrefill | None = None
        # SGLang's own backend for prefill, the dense layers and requests within the budget (``dense.py``)
        self.dense = dense_backend_for(self.dense_name, model_runner if self.staging is None
                                       else self.staging.runner_view(model_runner))
        self.num_layers = pool.layer_num
        self.H, self.d = pool.head_num, pool.head_dim
        self.v_d = getattr(pool, "v_head_dim", pool.head_dim)
        if cfg.dense_layers >= self.num_layers:
            raise IceCacheConfigError(f"dense_layers ({cfg.dense_layers}) leaves none of the model's "
                                      f"{self.num_layers} layers sparse")
        self.anchors = cfg.anchor_layers(self.num_layers)
        self.store_layer = {a: i for i, a in enumerate(self.anchors)}
        self._layers_per_anchor = {a: min(cfg.layer_reuse, self.num_layers - a) for a in self.anchors}
        self.anchor_of = {layer: self.anchors[(layer - cfg.dense_layers) // cfg.layer_reuse]
                          for layer in range(cfg.dense_layers, self.num_layers)}
        self.num_slots = pool.size + pool.page_size
        from sglang.srt.runtime_context import get_parallel

        rank = get_parallel().tp_rank
        self.metrics = m = IceCacheMetrics(rank=rank)
        self.run_dir = RunDir.from_env()
        shared = shared_key_store(pool)  # the pool's anchor K planes are the key store: keys kept once
        if shared is not None and getattr(pool, "anchors", None) != self.anchors:
            raise IceCacheConfigError(f"the KV pool shares the keys of layers {pool.anchors}, the backend "
                                      f"indexes {self.anchors}")
        self.keys_shared = shared is not None
        indexer = Indexer.launch(num_layers=len(self.anchors), num_kv_heads=self.H, head_dim=self.d,
                                 num_slots=self.num_slots, rank=rank, key_dtype=KEY_DTYPES[pool.dtype],
                                 index=cfg.index_config(), threads=cfg.indexer_threads,
                                 timeout_s=cfg.selection_deadline_ms / 1e3,
                                 store=shared[0] if shared else None, private_dir=shared[1] if shared else None)
        # the anchor layers' new keys into the store, when the pool does not hold them there (``key_writes.py``)
        self.key_writer = KeyStoreWriter(pool, indexer.store, self.store_layer, self.keys_shared)
        self.supervisor = IndexerSupervisor(indexer, m, max_restarts=cfg.max_restarts,
                                            restart_window_s=cfg.restart_window_s)
        self.selector = Selector(self.supervisor, self.H, len(self.anchors), m)
        self.tracker = SequenceTracker(indexer.client, list(range(len(self.anchors))), self.num_slots,
                                       sink=cfg.sink_tokens, window=cfg.window_tokens, budget=cfg.budget_tokens,
                                       block=cfg.page_size)
        self.attention = attention or decode_attention_for(cfg.decode_attention, pool.device)
        self.query_params = cfg.query_params()
        self.device_pool = None
        if cfg.offload:  # decode attention reads a fixed-size device pool, filled from SGLang's (host) pool
            lanes = cfg.device_lanes  # SGLang runs at most this many requests (patches/cli.py)
            self.device_pool = DeviceKVPool(
                num_layers=self.num_layers, groups={layer: self.anchor_of[layer] for layer in self.anchor_of},
                lanes=lanes, lane_rows=cfg.lane_rows, head_num=self.H, head_dim=self.d, v_head_dim=self.v_d,
                dtype=pool.dtype, device=self.device, num_slots=self.num_slots)
            m.device_kv_bytes, m.device_lanes = self.device_pool.nbytes, lanes
        elem = pool.dtype.itemsize
        bufs = [t for name in ("k_buffer", "v_buffer") for t in (getattr(pool, name, None) or [])]
        m.kv_pool_bytes = (sum(t.numel() * t.element_size() for t in bufs) if bufs  # the tensors SGLang allocated
                           else self.num_slots * self.num_layers * self.H * (self.d + self.v_d) * elem)
        m.keys_shared = int(self.keys_shared)
        m.kv_pool_host = int(bool(bufs) and bufs[0].device.type == "cpu")
        # a GPU writes the host pool's keys asynchronously: the indexer may read them once the stream has run
        self._host_writes = bool(getattr(pool, "host_writes_pending", False))
        m.key_store_bytes = 0 if self.keys_shared else indexer.store.spec.nbytes  # shared: inside kv_pool_bytes
        self._token_kv_bytes = self.H * (self.d + self.v_d) * elem  # one token, one layer
        self._row_bytes = (self.d + self.v_d) * elem  # one token, one KV head, one layer
        self.planner = Planner(tracker=self.tracker, selector=self.selector, metrics=m,
                               req_to_token=self.req_to_token_pool.req_to_token, num_kv_heads=self.H,
                               store_layer=self.store_layer, layers_per_anchor=self._layers_per_anchor,
                               slots_device=pool.device, device_pool=self.device_pool,
                               plan_slots=self.attention.reads_slots)
        self._step: DecodeStep | None = None
        self._graph: _GraphPass | None = None  # the decode graph pass under way (None: an eager pass)
        self._dense_graph_metadata: dict = {}  # captured batch size -> the dense backend's graph metadata
        self.last_layer = self.num_layers - 1
        self.req_to_token_pool.attach_aux_cache(_RowEvents(self, pool.size))
        events.subscribe(self.tracker.slots_freed, self.tracker.clear)
        if self.device_pool is not None:  # a slot freed under a live request must not stay a hit in its lane
            events.subscribe(self.device_pool.slots_freed, self.device_pool.clear)
        self.control = ControlWatcher(self.run_dir, self.launch_cfg)  # POST /icecache/config, applied per pass
        if self.run_dir is None:
            logger.warning("IceCache: no run directory ($ICECACHE_RUN_DIR): /icecache/stats and /icecache/config "
                           "are unavailable for this rank")
        self.publisher = SnapshotPublisher(rank, self.run_dir, self.collect)
        atexit.register(self.close)
        logger.info("IceCache on rank %d: %s; %d anchor layers of %d, dense attention %s, sparse decode "
                    "attention %s, indexer pid %s, key store %s", rank, cfg.to_json(), len(self.anchors),
                    self.num_layers, type(self.dense).__name__, type(self.attention).__name__,
                    indexer.process.pid, indexer.store.spec.path)

    @property
    def indexer(self) -> Indexer:
        return self.supervisor.indexer

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        events.unsubscribe(self.tracker.slots_freed, self.tracker.clear)
        if self.device_pool is not None:
            events.unsubscribe(self.device_pool.slots_freed, self.device_pool.clear)
        self.publisher.close(self.metrics.rank)
        try:
            self.supervisor.close()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            logger.info("IceCache indexer close: %s", e)

    # ------------------------------------------------------------------ SGLang backend interface
    def init_forward_metadata(self, forward_batch):
        self._graph = None
        self._begin_pass(forward_batch, forward_batch.batch_size)

    def _begin_pass(self, forward_batch, n: int) -> None:
        """A forward pass's start: the dense backend's metadata (eager passes), settings posted since the last
        pass, and for a decode step its first ``n`` requests' index writes and selection (``Planner.begin``);
        the rest of a graph's batch is padding."""
        self.key_writer.flush()  # a pass that ended before its last layer: its staged keys are in the pool
        self._step = self._staged = None
        mode = forward_batch.forward_mode
        if self._graph is None:  # a graph's replay has its dense metadata from the graph hooks
            if self.staging is not None and mode.is_extend() and forward_batch.batch_size:
                # offload: the dense backend attends over the batch's rows staged on the device
                self._staged = self.staging.begin(forward_batch, self.req_to_token_pool.req_to_token)
                self.dense.init_forward_metadata(self._staged.batch)
            elif self.staging is None or not mode.is_decode():  # offload decodes from the device pool only
                self.dense.init_forward_metadata(forward_batch)
        self._check_control()  # POST /icecache/config: applied between two forward passes
        self.supervisor.poll()
        self.planner.priming = None
        if not mode.is_decode() or n == 0 or (self._graph is not None and self._graph.capture):
            return
        rows, lens = self._rows_and_lens(forward_batch, n)
        self._wait_for_host_writes()  # the step's index writes name keys earlier passes wrote
        self._step = self.planner.begin(rows, lens, self.cfg)

    # ------------------------------------------------------------------ SGLang's decode CUDA graphs (breakable)
    # With ``--cuda-graph-backend-decode breakable`` SGLang captures a decode step's layers around their
    # attention, which runs eagerly between the captured segments (``_graph_attention``): the host selects
    # pages there, as in an eager step. SGLang pads a graph's batch to a captured size; the padding rows
    # attend densely in the dense layers (as in a stock graph) and are left out of everything else.
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        if self.staging is None:
            try:
                self.dense.init_cuda_graph_state(max_bs, max_num_tokens)
            except NotImplementedError:  # torch_native: its decode reads the batch itself, no graph state
                pass

    def get_cuda_graph_seq_len_fill_value(self):
        try:
            return self.dense.get_cuda_graph_seq_len_fill_value()
        except NotImplementedError:  # torch_native: its decode reads the padded batch's lengths itself
            return 1

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Before a decode graph's capture (a dummy batch: nothing is selected) or replay (SGLang's replay
        view of the batch, padded by ``num_padding`` rows).

        The dense backend plans its graph metadata for the padded batch here, as in a stock graph. A stock
        graph's kernels were recorded with that metadata's buffers; the dense layers here run eagerly in the
        break and read the backend's ``forward_metadata``, which its replay planning refreshes in place but
        does not assign (an eager pass in between, a prefill, leaves its own there): the object its capture
        made is put back before each replay."""
        bs = forward_batch.batch_size
        n = bs - int(getattr(forward_batch, "num_padding", 0) or 0)
        self._graph = _GraphPass(rows=0 if in_capture else n, capture=in_capture)
        if self.staging is None:
            self.dense.init_forward_metadata_out_graph(forward_batch, in_capture)
            if in_capture:
                self._dense_graph_metadata[bs] = getattr(self.dense, "forward_metadata", None)
            elif bs in self._dense_graph_metadata:
                self.dense.forward_metadata = self._dense_graph_metadata[bs]
        self._begin_pass(forward_batch, n)

    def init_forward_metadata_in_graph(self, forward_batch):
        if self.staging is None:
            self.dense.init_forward_metadata_in_graph(forward_batch)

    def _wait_for_host_writes(self) -> None:
        """Before index writes go out: the KV a GPU wrote into the host pool has landed (offload on a GPU)."""
        if self._host_writes:
            torch.cuda.current_stream().synchronize()

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        st = self._staged
        if st is None:
            o = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        else:  # offload: the prefix's rows host -> staging, attention there, the new tokens' KV into the pool
            lid, pool = layer.layer_id, self.token_to_kv_pool
            k_host, v_host = pool.get_key_buffer(lid), pool.get_value_buffer(lid)
            self.staging.load(st.prefix, k_host, v_host)
            if save_kv_cache and k is not None and v is not None:
                pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
                o = self.dense.forward_extend(q, k, v, layer, st.batch, True)
            else:  # the model wrote the new tokens' KV into the pool itself
                self.staging.load(st.new, k_host, v_host)
                o = self.dense.forward_extend(q, k, v, layer, st.batch, False)
        if not layer.is_cross_attention:
            self.key_writer.write_now(layer.layer_id, forward_batch.out_cache_loc)
        if layer.layer_id == self.last_layer:
            self._after_extend(forward_batch)
        return o

    def _after_extend(self, forward_batch) -> None:
        """A long request is indexed once, in one Build of the whole prompt, after its last prefill chunk
        (``events.prompt_ends``, told by ``patches/forward_batch.py``; without it, at its first decode step): a
        chunked prefill indexed chunk by chunk costs the indexer 3.7x (32k tokens) to 6.8x (64k) more (one
        Build, then an Insert per 8192-token chunk that grows the index and triggers its rebuilds; 8 KV
        heads, 2 cores, ``benchmarks/prefill_indexing.py``). A row that already has an index (a session's
        next turn on the same row) is updated and checked here: its tokens may have been re-pointed."""
        rows, lens = self._rows_and_lens(forward_batch)
        ends = events.prompt_ends(len(rows)) or [False] * len(rows)
        self._wait_for_host_writes()
        for row, n, final in zip(rows, lens, ends):
            if self.device_pool is not None:  # the row's tokens may have been re-pointed (a session's next turn)
                self.device_pool.release(row)
            next_turn = self.tracker.is_sparse(row)  # a session's next turn: its selections were for the turn before
            if next_turn or (final and n > self.cfg.budget_tokens):
                self.tracker.update(row, self.planner.row_slots(row, n), n, verify=True)
            if next_turn:
                self.planner.new_turn(row)

    @staticmethod
    def _rows_and_lens(forward_batch, n: int | None = None) -> tuple[list[int], list[int]]:
        """``req_to_token`` row and sequence length of each batch entry (the first ``n``), as Python ints."""
        lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
        return forward_batch.req_pool_indices[:n].cpu().tolist(), lens[:n].cpu().tolist()

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if self._graph is not None and is_in_breakable_cuda_graph():
            # inside a decode graph's capture: the attention becomes an eager break writing ``out``
            out = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim),
                              dtype=v.dtype if v is not None else q.dtype)
            self._graph_attention(q, k, v, out, layer, forward_batch, save_kv_cache)
            return out
        return self._decode(q, k, v, layer, forward_batch, save_kv_cache, q.shape[0])

    @eager_on_graph
    def _graph_attention(self, q, k, v, out, layer, forward_batch, save_kv_cache):
        """A decode graph's attention, run eagerly between its captured segments, at capture (a dummy batch:
        zeros) and at each replay (the batch ``init_forward_metadata_out_graph`` began)."""
        g = self._graph
        if g is None or g.capture or g.rows == 0:  # a capture's dummy batch, an idle (DP attention) rank
            out.zero_()
            return
        o = self._decode(q, k, v, layer, forward_batch, save_kv_cache, g.rows)
        out[: o.shape[0]].copy_(o.reshape(o.shape[0], -1))
        out[o.shape[0]:].zero_()

    def _decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool, n: int):
        """One layer's decode attention for the batch's first ``n`` requests (a graph's batch: the rest are
        padding, which only a dense layer attends, with the dense backend's padded metadata)."""
        step = self._step
        lid = layer.layer_id
        loc = forward_batch.out_cache_loc[:n]
        if step is None or lid < self.cfg.dense_layers or layer.is_cross_attention:
            o = self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            if not layer.is_cross_attention:
                self.key_writer.stage(lid, loc)
                if step is None and self.planner.priming is not None and lid >= self.cfg.dense_layers:
                    # rows decoding densely while their first selections are fetched: this layer's queries
                    self.planner.prime(lid, q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)[:n], self.cfg,
                                       self.query_params)
            if lid == self.last_layer:
                self.key_writer.flush()
            return o
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(loc, None), k[:n], v[:n])
        self.key_writer.stage(lid, loc)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)[:n]
        anchor = self.anchor_of[lid]
        plan = step.plans.get(anchor)
        if plan is None:
            plan = self.planner.plan(step, anchor, q3, self.cfg, self.query_params,
                                     keys=self.token_to_kv_pool.get_key_buffer(lid), scale=layer.scaling)
        dp = self.device_pool
        if dp is None:
            k_buf, v_buf = self.token_to_kv_pool.get_key_buffer(lid), self.token_to_kv_pool.get_value_buffer(lid)
        else:  # the plan names device rows; this layer's missed rows come from the host pool first
            dp.load(lid, step.misses[anchor], self.token_to_kv_pool.get_key_buffer(lid),
                    self.token_to_kv_pool.get_value_buffer(lid))
            k_buf, v_buf = dp.k[lid], dp.v[lid]
        o = self.attention.decode(q3, k_buf, v_buf, plan, layer.scaling)
        if lid == self.last_layer:
            self.key_writer.flush()
            self._finish_step(step)
        return o.reshape(q3.shape[0], layer.tp_q_head_num * layer.v_head_dim)

    def _finish_step(self, step: DecodeStep) -> None:
        m, sel = self.metrics, step.selection
        if self.device_pool is not None:
            m.device_kv_bytes_loaded_last = step.rows_loaded * self._row_bytes
            m.device_kv_bytes_loaded_total += m.device_kv_bytes_loaded_last
        if sel is None:  # offload, no sparse request: nothing was selected
            return
        self.supervisor.step_finished(sel.timed_out)
        m.decode_steps += 1
        m.selection_s_last = sel.wait_s
        m.selection_s_total += sel.wait_s
        m.write_wait_s_total += sel.write_wait_s
        m.pages_selected_total += sel.pages
        n_sel = max(len(step.sparse) * self.H * len(self.anchors), 1)
        m.pages_per_step_last = sel.pages / n_sel
        # KV tokens attended per request over all layers (computed from the plans, not allocated): each
        # anchor's plan counts once per layer it serves, dense layers count every token
        toks = sum(self._layers_per_anchor[a] * p.tokens_per_head.max(dim=1).values for a, p in step.plans.items())
        toks = toks[torch.from_numpy(step.sparse).to(toks.device)].cpu()
        toks += self.cfg.dense_layers * torch.from_numpy(step.lens[step.sparse])
        m.attended_kv_bytes_last = int(toks.max()) * self._token_kv_bytes
        m.attended_kv_bytes_max = max(m.attended_kv_bytes_max, m.attended_kv_bytes_last)
        if m.decode_steps % LOG_EVERY_STEPS == 0:  # beside SGLang's "Decode batch" line, same cadence
            m.live_seqs, m.retained_seqs = len(self.tracker.live), len(self.tracker.retained)
            logger.info(m.log_line())

    # ------------------------------------------------------------------ settings and figures
    def _check_control(self) -> None:
        """Apply settings posted to ``/icecache/config`` since the last forward pass (``control.py``)."""
        cfg = self.control.poll()
        if cfg is not None:
            self._apply_config(self.control.version, cfg)

    def _apply_config(self, version: int, cfg: IceCacheConfig) -> None:
        self.cfg = cfg
        self.tracker.budget = cfg.budget_tokens
        self.query_params = cfg.query_params()
        self.metrics.selection_age_steps_max = 0  # the bound may have changed
        self.indexer.client.timeout_s = cfg.selection_deadline_ms / 1e3  # the client survives restarts
        logger.info("IceCache: settings version %d: %s", version, cfg.to_json())

    def collect(self) -> dict:
        """The rank's snapshot (called by the publisher thread)."""
        m = self.metrics
        c = self.tracker.counters
        m.indexed_tokens, m.shared_tokens = c.indexed_tokens, c.shared_tokens
        m.live_seqs, m.retained_seqs = len(self.tracker.live), len(self.tracker.retained)
        m.unsent_writes = self.indexer.client.counters.unsent
        m.queries_in_flight = self.indexer.client.queries_in_flight()
        status = self.supervisor.status()
        ind = self.publisher.indexer_stats(status["endpoint"], self.H, self.launch_cfg.page_size)
        if ind is not None:
            m.index_bytes = ind["index_bytes"]
        m.icecache_host_bytes = m.key_store_bytes + m.index_bytes
        if self.device_pool is not None:
            m.device_lanes_in_use = self.device_pool.lanes_in_use
        if self.staging is not None:
            m.prefill_staging_bytes = self.staging.kv.nbytes_max
            m.prefill_rows_staged_total = self.staging.rows_gathered
            m.prefill_admission_deferrals_total = admission_deferrals()
        return m.snapshot() | {
            "tracker": self.tracker.summary(), "pid": os.getpid(), "indexer_pid": status["pid"],
            "indexer_state": status["state"], "indexer_reason": status["reason"],
            "indexer_endpoint": status["endpoint"], "ledger_sequences": len(self.indexer.client.ledger.seqs),
            "selection": self.cfg.selection, "gqa_merge": self.cfg.gqa_merge, "token_rerank": self.cfg.token_rerank,
            "step_reuse": self.cfg.step_reuse, "max_stale_steps": self.cfg.max_stale_steps,
            "budget_tokens": self.cfg.budget_tokens, "config_version": self.control.version,
            "deadline_s": self.indexer.client.timeout_s, "indexer": ind}
