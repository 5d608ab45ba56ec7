"""The indexer keeps answering while it builds: a query for another sequence is answered during a long Build,
a request for the sequence being built (or for every sequence) waits for it, each sequence's requests in
arrival order."""

import threading
import time

import numpy as np
import pytest

from icecache_sglang.index.config import IndexConfig
from icecache_sglang.indexer import Indexer
from icecache_sglang.indexer import protocol as p
from icecache_sglang.indexer.dispatch import EVERY, Dispatcher, sequences_of
from icecache_sglang.indexer.keystore import KeyStore
from icecache_sglang.indexer.config import IndexerConfig
from icecache_sglang.indexer.service import IndexerService

L, H, D, C = 4, 2, 64, 16
BIG = 65536  # a Build of this many tokens x L layers takes seconds on 2 cores; a query takes milliseconds


@pytest.fixture(scope="module")
def ix():
    ix = Indexer.launch(num_layers=L, num_kv_heads=H, head_dim=D, num_slots=BIG + 1024,
                        index=IndexConfig(page_size=C), timeout_s=30.0, threads=2)
    ix.store.keys[:] = np.random.default_rng(0).standard_normal(ix.store.keys.shape).astype(np.float32)
    yield ix
    ix.close()


def test_a_query_for_another_sequence_is_answered_during_a_build(ix):
    c = ix.client
    c.build(2, range(L), np.arange(BIG, BIG + 1000))
    c.sync(timeout_s=30)
    q = np.random.default_rng(1).standard_normal((1, 2 * H, D)).astype(np.float32)
    build = c.build(1, range(L), np.arange(BIG))
    c.insert(2, range(L), np.arange(BIG + 1000, BIG + 1010))  # another sequence's decode step
    other = c.submit(p.Query(layer=1, seqs=[2], n_pages=4), {"q": q})
    same = c.submit(p.Query(layer=1, seqs=[1], n_pages=4), {"q": q})
    rep, _ = c.wait(other, timeout_s=30)
    assert rep.ok and rep.result.n_tokens == [1010]  # after its own Insert, which did not wait for the Build
    assert not c.acked_through(build)  # the Build was still running when the other sequence's answer came
    assert c.pending_index_seqs() == {1}
    rep, _ = c.wait(same, timeout_s=60)
    assert rep.ok and rep.result.n_tokens == [BIG]  # held back until the Build was done, and saw it
    assert c.acked_through(build)
    c.sync(timeout_s=5)
    c.release([1, 2])
    c.sync(timeout_s=5)


def test_requests_for_every_sequence_wait_and_pings_do_not(tmp_path):
    store = KeyStore.create(str(tmp_path), 2, 1024, H, D)
    store.keys[:] = np.random.default_rng(0).standard_normal(store.keys.shape).astype(np.float32)
    cfg = IndexerConfig(rank=0, store=store.spec, endpoint="ipc://" + str(tmp_path / "s"), private_dir=str(tmp_path),
                        index=IndexConfig(page_size=C))
    svc = IndexerService(cfg, store)
    svc.warmup()
    d = Dispatcher(svc)
    gate = threading.Event()  # holds the first write's index work until the test lets it go
    real_run = svc.begin_write

    def gated(req, arrays):
        pending = real_run(req, arrays)
        run = pending.run
        pending.run = lambda: (gate.wait(10), run())
        return pending
    svc.begin_write = gated

    def send(rid, op, arrays=None):
        d.accept(b"r%d" % rid, [bytes(f) for f in p.encode_request(rid, op, arrays)])

    def replies():
        return [p.decode_reply([bytes(f) for f in frames])[0] for _, frames, _ in d.ready()]

    send(1, p.Build(seq=7, layers=[0, 1]), {"slots": np.arange(600, dtype=np.int32)})  # large: in the background
    send(2, p.Reset())
    send(3, p.Ping())
    send(4, p.Build(seq=8, layers=[0]), {"slots": np.arange(10, dtype=np.int32)})  # small, but behind the Reset
    got = replies()
    assert [r.id for r in got] == [3] and d.busy  # only the Ping (3)
    send(5, p.Shutdown())  # waits for everything before it
    send(6, p.Ping())  # answered at once: it names no sequence
    send(7, p.Build(seq=9, layers=[0]), {"slots": np.arange(10, dtype=np.int32)})  # after the Shutdown: never
    gate.set()
    deadline = time.monotonic() + 20
    ids = []
    while len(ids) < 4 and time.monotonic() < deadline:
        ids += [r.id for r in replies() if r.ok]
    time.sleep(0.1)
    ids += [r.id for r in replies()]
    assert ids == [6, 1, 2, 4, 5]
    assert svc.table.n_tokens(8, 0) == 10 and 7 not in svc.table  # the Reset came after seq 7's Build
    d.close()
    svc.close()
    store.close()


def test_what_each_request_names():
    assert sequences_of(p.Build(seq=3, layers=[0])) == {3}
    assert sequences_of(p.Query(layer=0, seqs=[1, 2], n_pages=2)) == {1, 2}
    assert sequences_of(p.Share(src=1, dst=4, prefix_len=3)) == {1, 4}
    assert sequences_of(p.Release(seqs=[5])) == {5}
    assert sequences_of(p.Ping()) == frozenset() and sequences_of(p.Stats()) == frozenset()
    assert sequences_of(p.Reset()) is EVERY and sequences_of(p.Shutdown()) is EVERY


def test_a_share_that_cuts_a_long_prefix_runs_in_the_background(tmp_path):
    store = KeyStore.create(str(tmp_path), 2, 2048, H, D)
    store.keys[:] = np.random.default_rng(0).standard_normal(store.keys.shape).astype(np.float32)
    cfg = IndexerConfig(rank=0, store=store.spec, endpoint="ipc://" + str(tmp_path / "s"), private_dir=str(tmp_path),
                        index=IndexConfig(page_size=C), write_workers=2)
    svc = IndexerService(cfg, store)
    svc.warmup()
    d = Dispatcher(svc)

    def send(rid, op, arrays=None):
        d.accept(b"r%d" % rid, [bytes(f) for f in p.encode_request(rid, op, arrays)])

    def wait_for(n):
        got, deadline = [], time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            got += [p.decode_reply([bytes(f) for f in frames])[0] for _, frames, _ in d.ready()]
        return got

    send(1, p.Build(seq=1, layers=[0, 1]), {"slots": np.arange(1500, dtype=np.int32)})
    assert [r.id for r in wait_for(1)] == [1]
    send(2, p.Share(src=1, dst=2, prefix_len=400))  # 1100 of 1500 tokens cut: a rebuild of the prefix per layer
    assert d.busy and not d._out  # on a background thread, not answered yet
    send(3, p.Share(src=1, dst=3, prefix_len=1500))  # whole indexes: references, but it names seq 1: waits
    send(4, p.Ping())
    got = wait_for(3)
    assert [r.id for r in got][0] == 4 and sorted(r.id for r in got) == [2, 3, 4]
    assert all(r.ok for r in got)
    assert [svc.table.n_tokens(2, layer) for layer in (0, 1)] == [400, 400]
    assert svc.table.get(3, 0) is svc.table.get(1, 0)  # shared, not copied
    idx = svc.table.get(2, 1)
    np.testing.assert_array_equal(np.sort(idx.positions[idx.live_ids()]), np.arange(400))
    assert svc.table.counters.trims == 2 and svc.table.counters.builds == 4  # 2 layers built, 2 prefixes rebuilt
    d.close()
    svc.close()
    store.close()


def test_a_large_insert_in_the_background_extends_the_index(tmp_path):
    """An Insert large enough for a background thread (a radix hit's new turn after a Share) adds to the
    index; it must not be taken for a Build (``p.Insert`` is a subclass of ``p.Build``)."""
    store = KeyStore.create(str(tmp_path), 2, 2048, H, D)
    store.keys[:] = np.random.default_rng(0).standard_normal(store.keys.shape).astype(np.float32)
    cfg = IndexerConfig(rank=0, store=store.spec, endpoint="ipc://" + str(tmp_path / "s"), private_dir=str(tmp_path),
                        index=IndexConfig(page_size=C), write_workers=2)
    svc = IndexerService(cfg, store)
    svc.warmup()
    d = Dispatcher(svc)
    got = []
    for rid, op, slots in ((1, p.Build(seq=1, layers=[0, 1]), np.arange(600)),
                           (2, p.Insert(seq=1, layers=[0, 1]), np.arange(600, 1300))):
        d.accept(b"r", [bytes(f) for f in p.encode_request(rid, op, {"slots": slots.astype(np.int32)})])
        deadline = time.monotonic() + 30
        while len(got) < rid and time.monotonic() < deadline:
            got += [p.decode_reply([bytes(f) for f in frames])[0] for _, frames, _ in d.ready()]
    assert [r.result.tokens for r in got] == [[600, 600], [1300, 1300]]
    assert [svc.table.n_tokens(1, layer) for layer in (0, 1)] == [1300, 1300]
    d.close()
    svc.close()
    store.close()
