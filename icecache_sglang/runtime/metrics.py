"""IceCache figures of one TP rank: counters the backend updates, a log line, and a JSON snapshot.

The snapshot (``snapshot()``) is what ``/metrics`` exports (``patches/metrics.py``) and what tests and
benchmarks read; the log line follows SGLang's decode log cadence.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class IceCacheMetrics:
    rank: int = 0
    decode_steps: int = 0  # decode forward passes with at least one sparse request
    sparse_rows: int = 0  # (request, step) pairs decoded sparsely
    dense_rows: int = 0  # (request, step) pairs decoded densely (short requests)
    queries: int = 0  # indexer queries (one per anchor layer and step)
    selection_s_total: float = 0.0  # wall time waiting for selections
    selection_s_last: float = 0.0  # per step (summed over anchor layers), last step
    pages_selected_total: int = 0  # pages selected, summed over requests, KV heads and anchor layers
    pages_per_step_last: float = 0.0  # pages per request and KV head and anchor layer, last step
    fallbacks: int = 0  # selections the indexer did not answer in time
    indexer_restarts: int = 0
    device_kv_bytes_last: int = 0  # KV bytes attended by the largest request of the last step, all layers
    device_kv_bytes_max: int = 0
    host_kv_bytes: int = 0  # the full KV pool of this rank
    key_store_bytes: int = 0  # keys shared with the indexer
    indexed_tokens: int = 0  # tokens sent to the indexer (per token, all anchor layers at once)
    shared_tokens: int = 0  # tokens reused from a cached prefix's index
    live_seqs: int = 0
    retained_seqs: int = 0
    updated_at: float = field(default_factory=time.time)

    def log_line(self) -> str:
        sel_ms = 1e3 * self.selection_s_total / max(self.decode_steps, 1)
        return (f"IceCache: sparse-req {self.live_seqs}, cached-idx {self.retained_seqs}, "
                f"sel {sel_ms:.2f} ms/step, pages/head {self.pages_per_step_last:.1f}, "
                f"dev-kv/req {self.device_kv_bytes_last / 2**20:.2f} MiB, host-kv {self.host_kv_bytes / 2**30:.2f} GiB, "
                f"fallbacks {self.fallbacks}, restarts {self.indexer_restarts}")

    def snapshot(self) -> dict:
        self.updated_at = time.time()
        return asdict(self)


def stats_dir() -> Path:
    """Where each rank publishes its snapshot (``$ICECACHE_STATS_DIR``, or a per-user temp folder)."""
    d = os.environ.get("ICECACHE_STATS_DIR") or os.path.join(tempfile.gettempdir(), f"icecache-stats-{os.getuid()}")
    return Path(d)


def snapshot_path(rank: int) -> Path:
    """``icecache-r<rank>-<port>.json`` (port: SGLang's, from ``ICECACHE_SERVER_PORT``)."""
    return stats_dir() / f"icecache-r{rank}-{os.environ.get('ICECACHE_SERVER_PORT', '0')}.json"


def write_snapshot(metrics: IceCacheMetrics, extra: dict | None = None) -> Path:
    """Atomically write the rank's snapshot."""
    path = snapshot_path(metrics.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = metrics.snapshot() | (extra or {})
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


#: the snapshot fields exported to Prometheus as ``sglang:icecache_<name>`` (gauges, one per TP rank)
PROMETHEUS_FIELDS = {
    "decode_steps": "decode forward passes with at least one sparse request",
    "sparse_rows": "request-steps decoded over sink + selected pages + recent tokens",
    "dense_rows": "request-steps decoded densely (requests within the budget)",
    "selection_s_total": "seconds spent waiting for page selections",
    "selection_s_last": "seconds spent waiting for page selections in the last step",
    "pages_per_step_last": "pages selected per request, KV head and anchor layer in the last step",
    "fallbacks": "selections the indexer did not answer in time (most recent pages used)",
    "indexer_restarts": "indexer processes restarted after dying",
    "device_kv_bytes_last": "KV bytes decode attention read for the largest request of the last step",
    "device_kv_bytes_max": "largest device_kv_bytes_last so far",
    "host_kv_bytes": "bytes of this rank's full KV pool",
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
