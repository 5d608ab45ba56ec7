"""Tensor parallelism 2 on CPU: each TP rank's scheduler runs its own indexer process over its own KV head
(the tiny model has 2), and both ranks decode sparsely from the same request."""

from __future__ import annotations

import os
import random

import pytest
from sglang_servers import LOG_DIR, TINY_ICE, icecache_args

from icecache_sglang.launch import ServerProcess
from icecache_sglang.models.tiny import ensure_tiny_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core per TP rank")]


def test_each_tp_rank_has_its_own_indexer_and_decodes_sparsely():
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SGLANG_CPU_OMP_THREADS_BIND="0|1")  # SGLang's CPU path: cores per rank
    srv = ServerProcess(ensure_tiny_model(), ["--tp", "2", *icecache_args(TINY_ICE)], env=env,
                        log_path=LOG_DIR / "tiny_ice_tp2.log")
    with srv:
        r = srv.generate(input_ids=random.Random(1).choices(range(100, 40000), k=1500), max_new_tokens=12)
        assert r["meta_info"]["completion_tokens"] == 12
        ranks = srv.icecache_stats() and srv.get("/icecache/stats")["ranks"]
        assert sorted(ranks) == ["0", "1"]
        assert ranks["0"]["indexer_pid"] != ranks["1"]["indexer_pid"]
        for st in ranks.values():
            assert st["sparse_rows"] >= 11 and st["fallbacks"] == 0
            assert st["indexer"]["sequences"] == 1
        # the ranks index the same positions of their own KV head
        assert ranks["0"]["indexer"]["tokens"] == ranks["1"]["indexer"]["tokens"] > 0
