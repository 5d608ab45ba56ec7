"""The indexer process: ``indexer_main`` is what the spawned child runs.

It names itself (``icecache-idx-r<rank>`` in ``ps``), asks Linux to send it SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``) and double-checks the parent pid while idle, maps the key store, compiles the numba
code, binds a ROUTER socket inside the private directory, reports ready through a pipe and serves until a
Shutdown message, SIGTERM or the parent's death. On the way out it closes the socket and removes the
socket file; if the parent is gone it also removes the private directory (segments included), so a
SIGKILLed server leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys
import traceback

import zmq

from . import protocol as p
from .config import IndexerConfig
from .dispatch import Dispatcher

logger = logging.getLogger("icecache.indexer")

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
IDLE_POLL_MS = 200
#: how often the loop looks for a finished write while one runs (the reply's added latency at most)
WRITE_POLL_MS = 2


def _prctl(option: int, arg) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def process_name(rank: int) -> str:
    return f"icecache-idx-r{rank}"


def _set_process_name(name: str) -> None:
    _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))
    try:
        import setproctitle  # optional; SGLang installs it

        setproctitle.setproctitle(name)
    except ImportError:
        pass


_stop_requested = False


def _on_term(signum, frame):
    # Only a flag: raising here could surface inside ZeroMQ's C code and be swallowed. The loop looks at it
    # at least every IDLE_POLL_MS.
    global _stop_requested
    _stop_requested = True


def indexer_main(config_json: str, ready_conn, parent_pid: int) -> None:
    """Entry point of the spawned indexer process."""
    # Idle OpenMP workers sleep instead of spinning: the indexer shares the machine's cores with the
    # scheduler (and, on CPU, the model). Must be set before numba's first parallel region.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        return
    logging.basicConfig(level=os.environ.get("ICECACHE_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s icecache-indexer %(levelname)s %(message)s")
    cfg = None
    sock = ctx = store = service = None
    try:
        cfg = IndexerConfig.from_json(config_json)
        _set_process_name(process_name(cfg.rank))
        import numba

        from .blas import set_blas_threads
        from .keystore import KeyStore
        from .service import IndexerService

        if cfg.threads is not None:
            numba.set_num_threads(min(cfg.threads, numba.config.NUMBA_NUM_THREADS))
        if cfg.blas_threads is not None:
            set_blas_threads(cfg.blas_threads)
        store = KeyStore.attach(cfg.store)
        service = IndexerService(cfg, store)
        service.warmup()
        ctx = zmq.Context(1)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        unlink_endpoint(cfg.endpoint)
        sock.bind(cfg.endpoint)
        ready_conn.send({"ok": True, "pid": os.getpid()})
        ready_conn.close()
        serve(sock, service, parent_pid)
    except BaseException:  # noqa: BLE001 - reported to the parent through the pipe
        tb = traceback.format_exc()
        logger.error("indexer failed: %s", tb)
        try:
            ready_conn.send({"ok": False, "error": tb})
        except (OSError, ValueError):
            pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if sock is not None:
            sock.close(0)
        if ctx is not None:
            ctx.term()
        if cfg is not None:
            unlink_endpoint(cfg.endpoint)
            if os.getppid() != parent_pid:  # orphaned: nobody else will clean up
                shutil.rmtree(cfg.private_dir, ignore_errors=True)
        if service is not None:
            service.close()
        if store is not None:
            store.close(unlink=False)


def serve(sock: zmq.Socket, service, parent_pid: int | None = None) -> None:
    """Answer requests until Shutdown (or the parent dies); a Build or Insert runs off this thread
    (:class:`~.dispatch.Dispatcher`), so other sequences' queries are answered while it runs."""
    dispatcher = Dispatcher(service)
    try:
        while not _stop_requested:
            if sock.poll(WRITE_POLL_MS if dispatcher.busy else IDLE_POLL_MS):
                frames = sock.recv_multipart(copy=False)
                dispatcher.accept(frames[0], frames[1:])
            elif not dispatcher.busy and parent_pid is not None and os.getppid() != parent_pid:
                logger.warning("parent %d is gone; exiting", parent_pid)
                return
            for route, reply, stop in dispatcher.ready():
                try:
                    sock.send_multipart([route] + reply, copy=False)
                except zmq.ZMQError as e:  # the peer went away; nothing to answer
                    logger.warning("reply not sent: %s", e)
                if stop:
                    return
    finally:
        dispatcher.close()


def unlink_endpoint(endpoint: str) -> None:
    """Remove a socket file left at ``endpoint``; raises ``OSError`` when something else sits there."""
    path = endpoint[len("ipc://"):]
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


if __name__ == "__main__":  # pragma: no cover - started through launcher.IndexerProcess
    sys.exit("start the indexer through icecache_sglang.indexer.launcher")
