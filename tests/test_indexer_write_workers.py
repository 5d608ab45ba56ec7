"""The layers of one Build or Insert indexed side by side by the indexer's write workers: the same indexes
as one layer after another, a failing layer loses nothing else, and the setting is checked."""

import numpy as np
import pytest

from icecache_sglang.index.config import IndexConfig
from icecache_sglang.index.schedule import LevelSchedule, schedule_levels
from icecache_sglang.indexer import protocol as p
from icecache_sglang.indexer.config import IndexerConfig
from icecache_sglang.indexer.keystore import KeyStore
from icecache_sglang.indexer.dispatch import answer as _answer
from icecache_sglang.indexer.service import IndexerService

L, S, H, D, C = 4, 900, 2, 8, 4


@pytest.fixture
def store(tmp_path):
    st = KeyStore.create(str(tmp_path), L, S, H, D)
    st.keys[:] = np.random.default_rng(0).standard_normal(st.keys.shape).astype(np.float32)
    yield st
    st.close()


def make_service(store, tmp_path, workers):
    cfg = IndexerConfig(rank=0, store=store.spec, endpoint="ipc://" + str(tmp_path / "s"), private_dir=str(tmp_path),
                        index=IndexConfig(page_size=C), write_workers=workers)
    svc = IndexerService(cfg, store)
    svc.warmup()
    return svc


def ask(service, op, arrays=None):
    reply, _ = _answer(service, p.encode_request(1, op, arrays))
    return p.decode_reply([bytes(f) for f in reply])


def pages_of(service, seq, q):
    out = []
    for layer in range(L):
        rep, arrays = ask(service, p.Query(layer=layer, seqs=[seq], n_pages=6, want_slots=True), {"q": q})
        assert rep.ok, rep.error
        out.append(arrays["slots"])
    return out


def test_workers_build_and_insert_the_same_indexes_as_one_layer_at_a_time(store, tmp_path):
    q = np.random.default_rng(1).standard_normal((1, 2 * H, D)).astype(np.float32)
    results = {}
    for workers in (1, 3):
        svc = make_service(store, tmp_path, workers)
        assert svc.write_workers == workers and (svc._pool is not None) == (workers > 1)
        rep, _ = ask(svc, p.Build(seq=5, layers=list(range(L))), {"slots": np.arange(600, dtype=np.int32)})
        assert rep.ok and rep.result.tokens == [600] * L
        rep, _ = ask(svc, p.Insert(seq=5, layers=list(range(L))), {"slots": np.arange(600, 640, dtype=np.int32)})
        assert rep.ok and rep.result.tokens == [640] * L
        assert (svc.table.counters.builds, svc.table.counters.inserts) == (L, L)
        results[workers] = pages_of(svc, 5, q)
        svc.close()
    for a, b in zip(results[1], results[3]):
        np.testing.assert_array_equal(a, b)


def test_a_failing_layer_keeps_the_others_and_the_old_index(store, tmp_path):
    svc = make_service(store, tmp_path, 3)
    slots = np.arange(600, dtype=np.int32)  # large enough for the write workers (POOLED_WRITE_TOKENS)
    assert ask(svc, p.Build(seq=1, layers=[0, 1, 2, 3]), {"slots": slots})[0].ok
    store.keys[2, 700:800] = np.nan  # layer 2's next keys cannot be indexed
    rep, _ = ask(svc, p.Build(seq=1, layers=[0, 1, 2, 3]), {"slots": np.arange(300, 900, dtype=np.int32)})
    assert not rep.ok and rep.code == "bad_request" and "NaN" in rep.error
    counts = [svc.table.n_tokens(1, layer) for layer in range(L)]
    assert counts == [600, 600, 600, 600]  # layers 0, 1 and 3 were rebuilt over slots 300..899, layer 2 kept
    idx0, idx2 = svc.table.get(1, 0), svc.table.get(1, 2)
    assert idx0.positions[idx0.live_ids()].min() == 300
    assert idx2.positions[idx2.live_ids()].min() == 0
    q = np.ones((1, 2 * H, D), np.float32)
    assert ask(svc, p.Query(layer=2, seqs=[1], n_pages=2), {"q": q})[0].ok  # still serving
    svc.close()


@pytest.mark.parametrize("bad", [0, -1, 65, 2.0, True, "4"])
def test_write_workers_is_checked(store, tmp_path, bad):
    with pytest.raises(ValueError, match="write_workers"):
        IndexerConfig(rank=0, store=store.spec, endpoint="ipc://" + str(tmp_path / "s"), private_dir=str(tmp_path),
                      write_workers=bad)


def test_the_level_schedule_is_computed_once_per_size_and_never_shared():
    a = schedule_levels(5000, 0.01, 0.2)
    np.testing.assert_array_equal(a, LevelSchedule(0.01, 0.2).assign(5000))
    a[:] = 7  # a caller's copy
    np.testing.assert_array_equal(schedule_levels(5000, 0.01, 0.2), LevelSchedule(0.01, 0.2).assign(5000))
