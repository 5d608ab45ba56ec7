"""Starting, stopping and restarting indexer processes (the runtime's side).

:class:`IndexerProcess` is one spawned child: start method ``spawn`` (a forked child would inherit the
scheduler's CUDA context and threads), configuration as JSON, readiness through a pipe (the child
reports ready only after its socket is bound and its numba code is loaded, or sends its traceback).

:class:`Indexer` is what one TP rank holds: the private directory, the key store it writes, the process
and an :class:`~.client.IndexerClient`. ``restart()`` replaces a dead or stuck process and rebuilds its
state from the client's ledger; ``close()`` leaves no process, socket or segment behind.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import replace
from typing import Self

from ..index.config import IndexConfig
from .client import IndexerClient
from .config import IndexerConfig
from .keystore import KeyStore, PrivateDir
from .server import indexer_main, process_name, unlink_endpoint

logger = logging.getLogger("icecache.indexer")

READY_TIMEOUT_S = 600.0  # a cold numba cache compiles for a few minutes on a small machine


class IndexerStartError(RuntimeError):
    pass


class IndexerProcess:
    def __init__(self, config: IndexerConfig):
        self.config = config
        self.proc: mp.process.BaseProcess | None = None

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> IndexerProcess:
        ctx = mp.get_context("spawn")
        recv_conn, send_conn = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=indexer_main, args=(self.config.to_json(), send_conn, os.getpid()),
                                name=process_name(self.config.rank), daemon=True)
        self.proc.start()
        send_conn.close()
        deadline = time.monotonic() + timeout_s
        msg = None
        while time.monotonic() < deadline:
            if recv_conn.poll(0.1):
                try:
                    msg = recv_conn.recv()
                except EOFError:
                    msg = None
                break
            if not self.proc.is_alive():
                break
        recv_conn.close()
        if not msg or not msg.get("ok"):
            self.kill()
            why = msg.get("error") if msg else (
                f"exit code {self.proc.exitcode}" if self.proc.exitcode is not None else f"not ready in {timeout_s} s")
            raise IndexerStartError(f"indexer for rank {self.config.rank} failed to start: {why}")
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout_s)
        self.kill()

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(5.0)
        unlink_endpoint(self.config.endpoint)


class Indexer:
    """Private directory + key store + indexer process + client, for one TP rank."""

    def __init__(self, private_dir: PrivateDir, store: KeyStore, config: IndexerConfig, timeout_s: float):
        self.dir = private_dir
        self.store = store
        self.config = config
        self.restarts = 0
        self.process = IndexerProcess(config).start()
        self.client = IndexerClient(config.endpoint, store.spec.num_kv_heads, config.page_size, timeout_s,
                                    is_alive=self.process.is_alive)
        self.client.ping(timeout_s=max(timeout_s, 10.0))

    @classmethod
    def launch(cls, *, num_layers: int, num_kv_heads: int, head_dim: int, num_slots: int, rank: int = 0,
               key_dtype: str = "float32", index: IndexConfig | None = None, threads: int | None = None,
               timeout_s: float = 5.0, root: str | None = None, **limits) -> Indexer:
        pdir = PrivateDir.create(root)
        try:
            store = KeyStore.create(pdir.path, num_layers, num_slots, num_kv_heads, head_dim, key_dtype,
                                    name=f"keys-r{rank}")
            config = IndexerConfig(rank=rank, store=store.spec, endpoint=pdir.endpoint(f"indexer-r{rank}-0.sock"),
                                   private_dir=pdir.path, index=index or IndexConfig(), threads=threads, **limits)
            return cls(pdir, store, config, timeout_s)
        except BaseException:
            pdir.cleanup()
            raise

    def restart(self) -> int:
        """Replace the process (killing it if it still runs) on a fresh socket and rebuild every sequence
        the ledger knows; returns the number of Build requests replayed."""
        self.process.kill()
        self.restarts += 1
        self.config = replace(self.config,
                              endpoint=self.dir.endpoint(f"indexer-r{self.config.rank}-{self.restarts}.sock"))
        self.process = IndexerProcess(self.config).start()
        self.client.is_alive = self.process.is_alive
        self.client.connect(self.config.endpoint)
        self.client.ping(timeout_s=max(self.client.timeout_s, 10.0))
        n = self.client.replay()
        logger.warning("indexer for rank %d restarted (%d): %d builds replayed", self.config.rank, self.restarts, n)
        return n

    def close(self) -> None:
        try:
            if self.process.is_alive():
                try:
                    self.client.shutdown(timeout_s=2.0)
                    self.process.proc.join(5.0)
                except Exception as e:  # noqa: BLE001 - stop() below handles a stuck or dead process
                    logger.info("indexer did not acknowledge shutdown: %s", e)
            self.process.stop()
        finally:
            self.client.close()
            self.store.close()
            self.dir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
