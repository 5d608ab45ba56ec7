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


def write_snapshot(metrics: IceCacheMetrics, extra: dict | None = None) -> Path:
    """Atomically write ``icecache-r<rank>-<port>.json`` (port: SGLang's, from ``ICECACHE_SERVER_PORT``)."""
    d = stats_dir()
    d.mkdir(parents=True, exist_ok=True)
    port = os.environ.get("ICECACHE_SERVER_PORT", "0")
    path = d / f"icecache-r{metrics.rank}-{port}.json"
    data = metrics.snapshot() | (extra or {})
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path
