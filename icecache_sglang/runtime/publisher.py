"""Each rank's figures, published: a daemon thread writes the rank's snapshot into the server's run
directory every ``SNAPSHOT_EVERY_S`` (``GET /icecache/stats`` reads it, ``/metrics`` gets the gauges), so
the scheduler never waits for it. The indexer's own counters come over a socket of this thread's own
(the scheduler's client is not thread-safe)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..indexer.client import IndexerClient
from .metrics import PrometheusExport, write_snapshot
from .rundir import RunDir, RunDirError, snapshot_name

logger = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 0.5


class SnapshotPublisher:
    def __init__(self, rank: int, run_dir: RunDir | None, collect: Callable[[], dict]):
        self.run_dir = run_dir
        self.collect = collect
        self.prometheus = PrometheusExport(rank)
        self._client: IndexerClient | None = None
        self._closed = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="icecache-stats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.wait(SNAPSHOT_EVERY_S):
            try:
                self.publish()
            except RunDirError as e:  # the directory was tampered with: say so once, keep serving
                if not self._warned:
                    logger.error("IceCache: stats not published: %s", e)
                    self._warned = True
            except Exception as e:  # noqa: BLE001 - dicts may change under us; the next round retries
                logger.debug("IceCache snapshot skipped: %s", e)

    def publish(self) -> dict:
        snap = self.collect()
        if self.run_dir is not None:
            write_snapshot(self.run_dir, snap)
        self.prometheus.update(snap)
        return snap

    def indexer_stats(self, endpoint: str, num_kv_heads: int, page_size: int) -> dict | None:
        """The indexer's counters (None when it does not answer within a second)."""
        c = self._client
        if c is None or c.endpoint != endpoint:
            if c is not None:
                c.close()
            c = self._client = IndexerClient(endpoint, num_kv_heads, page_size, timeout_s=1.0)
        try:
            st = c.stats(timeout_s=1.0)
        except Exception:  # noqa: BLE001 - a dead, stopped or busy indexer: no figures this round
            return None
        return {f: getattr(st, f) for f in st.__struct_fields__}

    def close(self, rank: int) -> None:
        """Stop publishing and remove the rank's snapshot."""
        self._closed.set()
        self._thread.join(2.0)
        if self.run_dir is not None:
            self.run_dir.unlink(snapshot_name(rank))
        if self._client is not None:
            self._client.close()
