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


def server_fixture(name: str, model_factory, args: list[str]):
    @pytest.fixture(scope="module")
    def _fixture():
        srv = start_server(name, model_factory(), args)
        try:
            yield srv
        finally:
            srv.stop()

    return _fixture
