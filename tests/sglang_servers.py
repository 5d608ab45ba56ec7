"""Real SGLang server processes for the tests (CPU path), one per configuration, started on first use."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

sglang = pytest.importorskip("sglang", reason="the server tests need the 'server' set-up (scripts/setup.sh)")

from icecache_sglang.launch import ServerProcess

LOG_DIR = Path(os.environ.get("ICECACHE_TEST_LOGS", tempfile.gettempdir())) / "icecache-test-servers"

#: the mechanics configuration: everything sparse beyond 128 tokens, from the first decode step (a step
#: waits for the request's index instead of attending densely while it is built: what these tests check is
#: the sparse decode; the default, ``while_indexing: dense``, has its own tests in test_server_indexing.py)
TINY_ICE = {"budget_tokens": 128, "page_size": 16, "sink_tokens": 16, "window_tokens": 16, "dense_layers": 0,
            "while_indexing": "wait"}
#: the real-model configuration (the paper's 256-token budget)
SMOL_ICE = {"budget_tokens": 256, "page_size": 16, "sink_tokens": 32, "window_tokens": 32, "dense_layers": 2,
            "while_indexing": "wait"}


def icecache_args(cfg: dict, *more: str) -> list[str]:
    return ["--enable-icecache", "--icecache-config", json.dumps(cfg), *more]


def start_server(name: str, model_path, args: list[str]) -> ServerProcess:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    srv = ServerProcess(model_path, args, log_path=LOG_DIR / f"{name}.log")
    srv.start()
    return srv


#: servers that modules share (``server_fixture(..., shared=True)``): (model path, args) -> server, stopped
#: when the session ends (conftest.py) rather than with a module, so the next module with the same launch
#: flags finds it up (a launch costs ~30 s on the CI machine)
_SHARED: dict[tuple, ServerProcess] = {}


def server_fixture(name: str, model_factory, args: list[str], shared: bool = False):
    """A module-scoped fixture with a server of these flags. ``shared``: one server for every module that
    asks with the same model and flags (and ``shared``); such modules put back any setting they change."""
    @pytest.fixture(scope="module")
    def _fixture():
        model = model_factory()
        if shared:
            key = (str(model), tuple(args))
            if key not in _SHARED or _SHARED[key].proc is None or _SHARED[key].proc.poll() is not None:
                if key in _SHARED:
                    _SHARED.pop(key).stop()  # what a dead one left behind
                _SHARED[key] = start_server(name, model, args)
            yield _SHARED[key]
            return
        srv = start_server(name, model, args)
        try:
            yield srv
        finally:
            srv.stop()

    return _fixture


def stop_shared() -> None:
    while _SHARED:
        _SHARED.popitem()[1].stop()
