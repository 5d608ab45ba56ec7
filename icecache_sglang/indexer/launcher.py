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
import sys
import threading
import time
import types
from contextlib import contextmanager
from dataclasses import replace
from typing import Self

from ..index.config import IndexConfig
from .client import IndexerClient
from .config import IndexerConfig
from .keystore import KeyStore, PrivateDir
from .server import indexer_main, process_name, unlink_endpoint

logger = logging.getLogger("icecache.indexer")

#: key store dtypes an int8 index's exact scan rescores from (the default index for these KV caches)
INT8_RESCORE_FROM = ("float32", "bfloat16")
READY_TIMEOUT_S = 600.0  # a cold numba cache compiles for a few minutes on a small machine
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_stat(pid: int) -> list[bytes] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first, process group third); None where
    it cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


class IndexerStartError(RuntimeError):
    pass


_main_swap = threading.Lock()


@contextmanager
def _bare_main():
    """While a child is spawned, ``__main__`` is an empty module, so the child does not import the parent's
    main module again. multiprocessing's spawn re-imports it (by name or path) in every child; inside SGLang's
    scheduler that is ``sglang.launch_server``, whose imports (torch, SGLang) took the indexer ~6 s of a
    ~9 s start and ~0.4 GB of memory it never uses, on every launch and every restart. The indexer's target
    and arguments live in this package, never in ``__main__``."""
    with _main_swap:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")  # no __spec__, no __file__: nothing to import
        try:
            yield
        finally:
            if main is not None:
                sys.modules["__main__"] = main


class IndexerProcess:
    def __init__(self, config: IndexerConfig):
        self.config = config
        self.proc: mp.process.BaseProcess | None = None
        self._ready = None  # the read end of the ready-report pipe, until the report is read

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> IndexerProcess:
        """Spawn the process and wait until it reports ready (or raise :class:`IndexerStartError`)."""
        return self.spawn().wait_ready(timeout_s)

    def spawn(self) -> IndexerProcess:
        """Start the child without waiting for it. Call this from a thread that outlives the child (the
        scheduler's): Linux sends the child its parent-death signal when the *thread* that forked it ends."""
        ctx = mp.get_context("spawn")
        self._ready, send_conn = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=indexer_main, args=(self.config.to_json(), send_conn, os.getpid()),
                                name=process_name(self.config.rank), daemon=True)
        with _bare_main():
            self.proc.start()
        send_conn.close()
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> IndexerProcess:
        """Wait for the spawned child's ready report (any thread may wait)."""
        recv_conn = self._ready
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

    def _stat(self) -> list[bytes] | None:
        return None if self.proc is None or self.proc.pid is None else proc_stat(self.proc.pid)

    def cpu_seconds(self) -> float | None:
        """CPU time the process has used (user + system, all threads); None where /proc cannot tell."""
        fields = self._stat()
        return None if fields is None else (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime

    def stopped(self) -> bool:
        """Whether the process is stopped (SIGSTOP, a debugger): alive, but it will not answer."""
        fields = self._stat()
        return fields is not None and fields[0] in (b"T", b"t")

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
        try:
            unlink_endpoint(self.config.endpoint)
        except OSError as e:  # something that is not our socket sits there: leave it, say so
            logger.warning("indexer endpoint %s not removed: %s", self.config.endpoint, e)


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
               timeout_s: float = 5.0, root: str | None = None, store: KeyStore | None = None,
               private_dir: PrivateDir | None = None, **limits) -> Indexer:
        """Create the rank's private directory and key store (or take over ``store`` and the
        ``private_dir`` it lives in: a KV pool whose K planes are the store), start the process, connect."""
        index = index or IndexConfig()
        if index.key_dtype is None:  # int8 page rows, rescored from the store (numba reads no float16: bfloat16)
            index = replace(index, key_dtype="int8" if key_dtype in INT8_RESCORE_FROM else "bfloat16")
        elif index.key_dtype == "int8" and key_dtype not in INT8_RESCORE_FROM:
            raise ValueError(f"an int8 index rescores its exact scan from the key store, which must be "
                             f"{' or '.join(INT8_RESCORE_FROM)}, not {key_dtype}")
        if store is not None:
            want = (num_layers, num_slots, num_kv_heads, head_dim)
            if store.spec.shape != want or store.spec.dtype != key_dtype or private_dir is None:
                raise ValueError(f"the given key store {store.spec} does not match {want} {key_dtype} "
                                 "(or comes without its private directory)")
        pdir = private_dir or PrivateDir.create(root)  # a given store and directory belong to the Indexer now
        created = private_dir is None
        try:
            if store is None:
                store = KeyStore.create(pdir.path, num_layers, num_slots, num_kv_heads, head_dim, key_dtype,
                                        name=f"keys-r{rank}")
            config = IndexerConfig(rank=rank, store=store.spec, endpoint=pdir.endpoint(f"indexer-r{rank}-0.sock"),
                                   private_dir=pdir.path, index=index, threads=threads, **limits)
            return cls(pdir, store, config, timeout_s)
        except BaseException:
            if created:  # a given directory stays with its owner (the KV pool), which still maps its store
                pdir.cleanup()
            raise

    def restart(self) -> int:
        """Replace the process (killing it if it still runs) on a fresh socket and rebuild every sequence
        the ledger knows; returns the number of Build requests replayed. Blocks until the new process is
        up; :meth:`replacement` + :meth:`adopt` do the same in two halves, so the wait can happen off the
        caller's thread."""
        self.process.kill()
        return self.adopt(self.replacement().start())

    def replacement(self) -> IndexerProcess:
        """A not yet started process for the same configuration on a fresh socket. Waiting for it to be
        ready touches neither the client nor the current process, so it may happen in another thread."""
        self.restarts += 1
        cfg = replace(self.config, endpoint=self.dir.endpoint(f"indexer-r{self.config.rank}-{self.restarts}.sock"))
        return IndexerProcess(cfg)

    def adopt(self, process: IndexerProcess, ping_timeout_s: float = 10.0) -> int:
        """Make a started replacement the rank's indexer: connect, check it answers, replay the ledger.
        Returns the number of Build requests replayed. Raises (and kills it) if it does not answer."""
        old = self.process
        self.process, self.config = process, process.config
        self.client.is_alive = process.is_alive
        self.client.connect(process.config.endpoint)
        try:
            self.client.ping(timeout_s=ping_timeout_s)
        except Exception:
            process.kill()
            raise
        if old is not process:
            old.kill()
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
