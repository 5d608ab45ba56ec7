"""The indexer's warmup compiles what real requests use: after it, no request meets a numba function with
argument types it has not compiled for (a compile inside a request is seconds: the H100 server's first
query took about 2 s and its switch to sparse timed out for 4 steps, bringup/attempt12)."""

import sys
from dataclasses import replace

import numba
import numpy as np
import pytest
from numba.core.registry import CPUDispatcher

from icecache_sglang.index import lowrank
from icecache_sglang.index.keys import to_storage
from icecache_sglang.indexer import protocol as p
from icecache_sglang.indexer.config import IndexerConfig
from icecache_sglang.indexer.keystore import KeyStore
from icecache_sglang.indexer.policies import POLICIES
from icecache_sglang.indexer import service
from icecache_sglang.indexer.service import IndexerService
from icecache_sglang.runtime.config import IceCacheConfig

H, D, N = 2, 16, lowrank.MIN_TOKENS + 100


def compiled_signatures() -> dict[str, int]:
    """How many type signatures each numba function of the index and the indexer has compiled or loaded."""
    out = {}
    for modname, mod in list(sys.modules.items()):
        if modname.startswith(("icecache_sglang.index", "icecache_sglang.indexer")) and mod is not None:
            for name, obj in vars(mod).items():
                if isinstance(obj, CPUDispatcher):
                    out[f"{modname}.{name}"] = len(obj.signatures)
    return out


def call(svc, op, arrays=None):
    return svc.handle(*p.as_received(7, op, arrays))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_no_request_compiles_after_warmup(tmp_path, dtype, monkeypatch):
    owner = KeyStore.create(str(tmp_path), 2, N + 16, H, D, dtype=dtype)
    rng = np.random.default_rng(0)
    for layer in range(2):
        owner.write(layer, np.arange(N + 16), to_storage(rng.standard_normal((N + 16, H, D)).astype(np.float32), dtype))
    store = KeyStore.attach(owner.spec)  # read-only, as the indexer process maps it
    cfg = IndexerConfig(rank=0, store=owner.spec, endpoint=f"ipc://{tmp_path}/s", private_dir=str(tmp_path),
                        index=IceCacheConfig().index_config(), threads=2)
    svc = IndexerService(cfg, store)
    try:
        svc.warmup()
        before = compiled_signatures()
        assert sum(before.values()) > 0
        call(svc, p.Build(seq=1, layers=[0, 1]), {"slots": np.arange(N, dtype=np.int32)})
        call(svc, p.Build(seq=2, layers=[0, 1]), {"slots": np.arange(N // 2, dtype=np.int32)})
        call(svc, p.Insert(seq=1, layers=[0, 1]), {"slots": np.arange(N, N + 1, dtype=np.int32)})
        call(svc, p.Share(src=1, dst=3, prefix_len=N // 2))
        q = rng.standard_normal((2, 4 * H, D)).astype(np.float32)
        qb = (q.view(np.uint32) >> 16).astype(np.uint16)
        for policy in POLICIES:
            for merge in ("rank", "mass"):
                res, arrays = call(svc, p.Query(layer=1, seqs=[1], n_pages=8, policy=policy, merge=merge),
                                   {"q": (qb[:1], "bfloat16")})
                assert res.n_tokens == [N + 1]
                call(svc, p.Query(layer=0, seqs=[1, 2], n_pages=8, policy=policy, merge=merge), {"q": q})
        monkeypatch.setattr(service, "SERIAL_SCAN_ELEMENTS", 0)  # every sequence long, and long ones
        monkeypatch.setattr(service, "BATCHED_LONG_SEQUENCES", 99)  # scanned one at a time (scan_index)
        for merge in ("rank", "mass"):
            call(svc, p.Query(layer=0, seqs=[1, 2], n_pages=8, policy="exact", merge=merge), {"q": q})
        monkeypatch.undo()
        for _ in range(lowrank.FIT_AFTER + 2):  # seq 1 is long enough: its low-rank codes are fitted and used
            call(svc, p.Query(layer=1, seqs=[1], n_pages=8, policy="lowrank", merge="mass"), {"q": (qb[:1], "bfloat16")})
        assert svc.table.get(1, 1).lowrank.ready()
        call(svc, p.Release(seqs=[1, 2, 3]))
        after = compiled_signatures()
        grown = {k: (before.get(k, 0), v) for k, v in after.items() if v != before.get(k, 0)}
        assert not grown, f"compiled inside requests (signatures before, after): {grown}"
        assert svc.stats().sequences == 0  # warmup's scratch sequences were never in this table
    finally:
        svc.close()
        store.close()
        owner.close()
    assert numba.get_num_threads() >= 1


def test_warmup_respects_the_query_limits_and_writes_no_file(tmp_path):
    """Warmup's queries stay within ``max_pages`` / ``max_batch`` (an out-of-range query would be refused and
    the indexer never ready), and its scratch store is anonymous memory: nothing in the private directory,
    whose /dev/shm may be nearly filled by the real store."""
    owner = KeyStore.create(str(tmp_path), 1, 64, H, D, dtype="bfloat16")
    store = KeyStore.attach(owner.spec)
    before = sorted(p.name for p in tmp_path.iterdir())
    cfg = IndexerConfig(rank=0, store=owner.spec, endpoint=f"ipc://{tmp_path}/s", private_dir=str(tmp_path),
                        index=IceCacheConfig().index_config(), max_pages=2, max_batch=1)
    svc = IndexerService(cfg, store)
    try:
        svc.warmup()
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert svc.stats().sequences == 0 and svc.errors == 0
    finally:
        svc.close()
        store.close()
        owner.close()


@pytest.mark.parametrize("d,page", [(64, 16), (128, 64)])
def test_warmup_compiles_the_low_rank_first_pass(tmp_path, d, page):
    """The warmup's sequence (600 tokens at these head dims) is too short for the low-rank path, which a real
    long sequence reaches after ``FIT_AFTER`` queries: the warmup forces it on a copy (``lowrank.warm``), with
    few enough candidates that the first pass runs even over its few large pages."""
    n = lowrank.MIN_TOKENS + 100
    owner = KeyStore.create(str(tmp_path), 1, n, H, d, dtype="bfloat16")
    rng = np.random.default_rng(0)
    owner.write(0, np.arange(n), to_storage(rng.standard_normal((n, H, d)).astype(np.float32), "bfloat16"))
    store = KeyStore.attach(owner.spec)
    cfg = IndexerConfig(rank=0, store=owner.spec, endpoint=f"ipc://{tmp_path}/s", private_dir=str(tmp_path),
                        index=replace(IceCacheConfig().index_config(), page_size=page), threads=2)
    svc = IndexerService(cfg, store)
    try:
        svc.warmup()
        assert svc.warmup_tokens() < lowrank.MIN_TOKENS
        before = compiled_signatures()
        call(svc, p.Build(seq=1, layers=[0]), {"slots": np.arange(n, dtype=np.int32)})
        q = rng.standard_normal((1, 4 * H, d)).astype(np.float32)
        for _ in range(lowrank.FIT_AFTER + 2):
            call(svc, p.Query(layer=0, seqs=[1], n_pages=8, policy="lowrank", merge="mass"), {"q": q})
        assert svc.table.get(1, 0).lowrank.ready() and svc.stats().lowrank_rows > 0
        grown = {k: v for k, v in compiled_signatures().items() if v != before.get(k, 0)}
        assert not grown, f"compiled inside requests: {grown}"
    finally:
        svc.close()
        store.close()
        owner.close()
