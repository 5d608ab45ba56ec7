"""IceCache figures of one TP rank: counters the runtime updates, a log line, and a JSON snapshot.

The snapshot (``snapshot()``) is what ``GET /icecache/stats`` serves and ``/metrics`` exports
(``patches/metrics.py``), and what tests and benchmarks read; the log line follows SGLang's decode log
cadence. Each figure says what it is: **allocated** bytes are sizes of memory that exists (SGLang's KV
pool, the key store mapping, the indexer's index arrays); **attended** bytes are computed from the decode
plan (how much KV the sparse attention read), not an allocation.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from .rundir import RunDir, snapshot_name


@dataclass
class IceCacheMetrics:
    rank: int = 0
    decode_steps: int = 0  # decode forward passes with at least one sparse request
    sparse_rows: int = 0  # (request, step) pairs decoded sparsely
    dense_rows: int = 0  # (request, step) pairs decoded densely (requests within the budget, or while indexing)
    dense_while_indexing_rows: int = 0  # (request, step) pairs beyond the budget decoded densely: indexer behind
    # (or not serving) with while_indexing: dense
    queries: int = 0  # indexer queries (one per anchor layer, step and 64-request chunk)
    primed_rows: int = 0  # (request, step) pairs decoded densely while their first selections were fetched
    # (asynchronous selection; counted in dense_while_indexing_rows too)
    queries_deferred: int = 0  # asynchronous query messages their layer did not wait for (their copy to the host
    # still running on a GPU): sent once it landed, or dropped unsent when no longer of use
    queries_spaced: int = 0  # asynchronous (request, layer, step) queries not sent because the indexer was behind
    # (queries spaced out to every ceil(max_stale_steps / 2) steps; the selection in hand was young enough)
    selection_s_total: float = 0.0  # wall time decode steps waited for selections (all anchor layers)
    selection_s_last: float = 0.0  # per step (summed over anchor layers), last step
    write_wait_s_total: float = 0.0  # wall time decode steps waited for index writes (while_indexing: wait)
    pages_selected_total: int = 0  # pages selected, summed over requests, KV heads and anchor layers
    pages_per_step_last: float = 0.0  # pages per request and KV head and anchor layer, last step
    fallbacks: int = 0  # selections made without the indexer's answer (most recent pages used)
    reused_selections: int = 0  # (request, anchor layer, step) served by a selection made at an earlier step
    reranked_selections: int = 0  # (request, anchor layer, step) whose tokens were re-ranked by the step's query
    # among token_rerank x the budget's pages
    selection_age_steps_total: int = 0  # steps since their query, summed over those reused selections
    selection_age_steps_max: int = 0  # the oldest selection a step attended with (steps since its query), since
    # the settings last changed (the bound is a setting)
    queries_in_flight: int = 0  # queries sent and not yet read (asynchronous selection), at the snapshot
    timed_out_steps: int = 0  # decode steps whose selection deadline passed
    indexer_restarts: int = 0  # replacement indexer processes that came up
    failed_restarts: int = 0  # replacements that did not start
    stuck_kills: int = 0  # indexers killed because they stopped answering (alive but silent)
    unsent_writes: int = 0  # index writes that found no indexer (kept in the ledger, replayed later)
    indexer_up: int = 1  # 1 while an indexer answers this rank's selections, 0 while it is down/restarting
    attended_kv_bytes_last: int = 0  # computed: KV bytes the largest request's decode attention read, all layers
    attended_kv_bytes_max: int = 0
    kv_pool_bytes: int = 0  # allocated: SGLang's KV pool of this rank (K and V, every layer and slot)
    key_store_bytes: int = 0  # allocated: the key store beyond SGLang's pool (anchor layers' keys, read by the
    # indexer); 0 when the pool's anchor K planes are the store (keys_shared)
    keys_shared: int = 0  # 1 when SGLang's KV pool holds the anchor layers' keys in the indexer's store
    index_bytes: int = 0  # allocated: the indexer's index arrays (its own key copies, projections, pages)
    icecache_host_bytes: int = 0  # key_store_bytes + index_bytes: host memory IceCache adds to SGLang's
    device_kv_bytes: int = 0  # allocated (offload): the decode's device pool, K and V of every lane and layer
    device_lanes: int = 0  # offload: requests the device pool holds at once
    device_lanes_in_use: int = 0
    device_rows_loaded: int = 0  # offload: (token, KV head, layer) rows copied host -> device
    device_rows_hit: int = 0  # offload: rows a step attended that the device pool already held
    device_kv_bytes_loaded_last: int = 0  # offload: bytes copied host -> device in the last step, all layers
    device_kv_bytes_loaded_total: int = 0
    kv_pool_host: int = 0  # 1 when SGLang's KV pool (kv_pool_bytes) is host memory: a machine without a GPU, or
    # offload on a GPU (the pool pinned in host memory, sized by host_kv_gb)
    prefill_staging_bytes: int = 0  # allocated (offload): the device buffer prefill attends over (at launch)
    prefill_rows_staged_total: int = 0  # offload: (token, layer) rows gathered host -> staging for prefill
    prefill_admission_deferrals_total: int = 0  # offload: times admission held a request back for the staging buffer
    indexed_tokens: int = 0  # tokens sent to the indexer (per token, all anchor layers at once)
    shared_tokens: int = 0  # tokens reused from a cached prefix's index
    live_seqs: int = 0
    retained_seqs: int = 0
    updated_at: float = field(default_factory=time.time)

    def log_line(self) -> str:
        sel_ms = 1e3 * self.selection_s_total / max(self.decode_steps, 1)
        return (f"IceCache: sparse-req {self.live_seqs}, cached-idx {self.retained_seqs}, "
                f"sel {sel_ms:.2f} ms/step, index-wait {self.write_wait_s_total:.2f} s, "
                f"dense-while-indexing {self.dense_while_indexing_rows}, pages/head {self.pages_per_step_last:.1f}, "
                f"attended-kv/req {self.attended_kv_bytes_last / 2**20:.2f} MiB, "
                f"kv-pool {self.kv_pool_bytes / 2**30:.2f} GiB, icecache-host {self.icecache_host_bytes / 2**30:.2f} GiB, "
                f"fallbacks {self.fallbacks}, restarts {self.indexer_restarts}, indexer {'up' if self.indexer_up else 'DOWN'}")

    def snapshot(self) -> dict:
        self.updated_at = time.time()
        return asdict(self)


def write_snapshot(run_dir: RunDir, data: dict) -> None:
    run_dir.write_json(snapshot_name(data["rank"]), data)


#: the snapshot fields exported to Prometheus as ``sglang:icecache_<name>`` (gauges, one per TP rank)
PROMETHEUS_FIELDS = {
    "decode_steps": "decode forward passes with at least one sparse request",
    "sparse_rows": "request-steps decoded over sink + selected pages + recent tokens",
    "dense_rows": "request-steps decoded densely (requests within the budget, or while the indexer is behind)",
    "dense_while_indexing_rows": "request-steps beyond the budget decoded densely because the indexer was behind or not serving",
    "selection_s_total": "seconds decode steps waited for selections",
    "selection_s_last": "seconds the last decode step waited for selections",
    "write_wait_s_total": "seconds decode steps waited for index writes (a new request's index)",
    "pages_per_step_last": "pages selected per request, KV head and anchor layer in the last step",
    "fallbacks": "selections made without the indexer's answer (most recent pages used)",
    "reused_selections": "request-layer-steps served by a selection made at an earlier step (step_reuse, max_stale_steps)",
    "reranked_selections": "request-layer-steps whose tokens were re-ranked by the step's query (token_rerank)",
    "selection_age_steps_max": "the oldest selection a decode step attended with, in steps since its query",
    "queries_in_flight": "indexer queries sent and not yet read (asynchronous selection)",
    "primed_rows": "request-steps decoded densely while their first selections were fetched (asynchronous)",
    "queries_deferred": "asynchronous query messages their layer did not wait for (copy to the host still running)",
    "queries_spaced": "asynchronous request-layer queries not sent while the indexer was behind (spaced out)",
    "timed_out_steps": "decode steps whose selection deadline passed",
    "indexer_restarts": "replacement indexer processes started",
    "failed_restarts": "replacement indexer processes that failed to start",
    "stuck_kills": "indexer processes killed because they stopped answering",
    "unsent_writes": "index writes that found no indexer (kept for replay)",
    "indexer_up": "1 while the indexer serves this rank, 0 while it is down or restarting",
    "attended_kv_bytes_last": "computed KV bytes decode attention read for the largest request of the last step",
    "attended_kv_bytes_max": "largest attended_kv_bytes_last so far",
    "kv_pool_bytes": "allocated bytes of SGLang's KV pool of this rank",
    "key_store_bytes": "allocated bytes of the key store beyond SGLang's KV pool (0 when the pool's keys are the store)",
    "keys_shared": "1 when SGLang's KV pool holds the anchor layers' keys in the indexer's key store (one copy)",
    "index_bytes": "allocated bytes of the indexer's indexes",
    "icecache_host_bytes": "host bytes IceCache adds beyond SGLang's KV pool (key store + indexes)",
    "device_kv_bytes": "allocated bytes of the offloaded decode's device pool",
    "device_lanes": "requests the offloaded decode's device pool holds at once",
    "device_lanes_in_use": "device pool lanes held by decoding requests",
    "device_rows_loaded": "(token, KV head, layer) rows copied host -> device for decode",
    "device_rows_hit": "(token, KV head, layer) rows decode attended that the device pool already held",
    "device_kv_bytes_loaded_last": "bytes copied host -> device in the last decode step",
    "device_kv_bytes_loaded_total": "bytes copied host -> device for decode",
    "prefill_staging_bytes": "allocated bytes of the device buffer prefill attends over (offload)",
    "prefill_admission_deferrals_total": "times prefill admission held a request back to a later batch for the staging buffer",
    "indexed_tokens": "tokens sent to the indexer",
    "shared_tokens": "tokens reused from cached prefixes' indexes",
    "live_seqs": "running requests with an index",
    "retained_seqs": "indexes kept for radix-cache prefixes",
}


class PrometheusExport:
    """Gauges in SGLang's Prometheus multiprocess directory (present with ``--enable-metrics``), so the
    figures appear in ``/metrics`` beside SGLang's own."""

    def __init__(self, rank: int):
        self.gauges = None
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return
        try:
            from prometheus_client import Gauge
        except ImportError:
            return
        self.rank = str(rank)
        self.gauges = {name: Gauge(f"sglang:icecache_{name}", doc, labelnames=["tp_rank"],
                                   multiprocess_mode="mostrecent")
                       for name, doc in PROMETHEUS_FIELDS.items()}

    def update(self, snapshot: dict) -> None:
        if self.gauges is None:
            return
        for name, g in self.gauges.items():
            g.labels(tp_rank=self.rank).set(float(snapshot.get(name) or 0))
