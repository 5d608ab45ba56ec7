"""The indexer as a real spawned process behind real ZeroMQ sockets and a real shared-memory segment."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from icecache_sglang.index.config import IndexConfig
from icecache_sglang.index.paged_index import PagedDCIIndex
from icecache_sglang.indexer import Indexer, KeyStore
from icecache_sglang.indexer import protocol as p
from icecache_sglang.indexer.blas import blas_threads, set_blas_threads
from icecache_sglang.indexer.fuzz import fuzzed_messages
from icecache_sglang.indexer.server import process_name
from icecache_sglang.indexer.service import IndexerService

L, S, H, D, C, GROUP = 3, 8192, 2, 16, 8, 2


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)  # zombie
    except FileNotFoundError:
        return True


def _wait_exit(pid: int, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _exited(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def ix():
    ix = Indexer.launch(num_layers=L, num_kv_heads=H, head_dim=D, num_slots=S, index=IndexConfig(page_size=C),
                        timeout_s=10.0, threads=2)
    ix.store.keys[:] = np.random.default_rng(0).standard_normal(ix.store.keys.shape).astype(np.float32)
    yield ix
    ix.close()
    assert not os.path.exists(ix.dir.path)  # socket and key segment gone with it


@pytest.fixture
def local(ix):
    """The same service code in this process over the same shared segment, for exact comparisons."""
    store = KeyStore.attach(ix.store.spec)
    yield IndexerService(ix.config, store)
    store.close()


def local_call(service, rid, op, arrays=None):
    return service.handle(*p.as_received(rid, op, arrays))


def test_start_ready_name_and_clean_stop():
    ix = Indexer.launch(num_layers=1, num_kv_heads=1, head_dim=8, num_slots=64)
    pid, d = ix.process.pid, ix.dir.path
    assert ix.process.is_alive() and pid != os.getpid()
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == process_name(0)[:15]
    pong = ix.client.ping()
    assert (pong.pid, pong.num_layers, pong.num_kv_heads, pong.head_dim, pong.num_slots) == (pid, 1, 1, 8, 64)
    assert os.path.exists(ix.config.endpoint[len("ipc://"):]) and os.path.exists(ix.store.spec.path)
    assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    ix.close()
    assert _wait_exit(pid) and not os.path.exists(d)


def test_the_indexer_runs_openblas_on_one_thread_and_numba_on_its_threads(ix):
    """NumPy's BLAS defaults to every core; in the indexer it would spin beside numba's threads and the write
    workers (a 32k Build of 8 layers 3.0x slower on the H100 machine's 16 cores, benchmarks/results/gpu/
    indexer_host). The indexer sets it to one thread, and says so in its stats."""
    if not blas_threads():
        pytest.skip("no OpenBLAS in this NumPy")
    st = ix.client.stats()
    assert st.blas_threads == 1 and st.numba_threads == 2
    assert ix.config.blas_threads == 1


def test_set_blas_threads_sets_and_restores_this_process():
    if not blas_threads():
        pytest.skip("no OpenBLAS in this NumPy")
    before = set_blas_threads(1)
    try:
        assert set(blas_threads().values()) == {1}
    finally:
        for n in set(before.values()):
            set_blas_threads(n)
    assert blas_threads() == before
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError):
            set_blas_threads(bad)


def test_parent_sigkill_takes_the_indexer_and_its_segment_with_it():
    code = (
        "import json, time\n"
        "from icecache_sglang.indexer import Indexer\n"
        "ix = Indexer.launch(num_layers=1, num_kv_heads=1, head_dim=8, num_slots=64)\n"
        "print(json.dumps({'child': ix.process.pid, 'dir': ix.dir.path, 'seg': ix.store.spec.path}), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONSAFEPATH": "1"})
    try:
        info = json.loads(parent.stdout.readline())
        assert not _exited(info["child"]) and os.path.exists(info["seg"])
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_exit(info["child"]), "indexer outlived its SIGKILLed parent"
        deadline = time.monotonic() + 10
        while os.path.exists(info["dir"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(info["dir"]) and not os.path.exists(info["seg"])
    finally:
        parent.kill()


def test_queries_equal_the_in_process_index(ix):
    rng = np.random.default_rng(1)
    c = ix.client
    seqs = {}
    for seq in range(5):
        slots = rng.permutation(S)[: rng.integers(200, 900)]
        c.build(100 + seq, range(L), slots)
        extra = rng.permutation(np.setdiff1d(np.arange(S), slots))[:37]
        c.insert(100 + seq, range(L), extra)
        seqs[100 + seq] = (slots, extra)
    c.sync()
    q = rng.standard_normal((5, H * GROUP, D)).astype(np.float32)
    assert ix.config.index.key_dtype == "int8"  # the default over a float32 (or bfloat16) key store
    for layer in range(L):
        sel = c.query(layer, list(seqs), q, 6)
        assert not sel.fallback
        for b, (seq, (slots, extra)) in enumerate(seqs.items()):
            idx = PagedDCIIndex(H, D, config=IndexConfig(page_size=C, key_dtype="int8"))
            idx.build(ix.store.read(layer, slots), positions=slots)
            idx.insert(ix.store.read(layer, extra), positions=extra)
            pages = idx.query(q[b], 6)
            np.testing.assert_array_equal(sel.pages[b], pages)
            assert sel.n_tokens[b] == slots.size + extra.size
            for h in range(H):
                got = sel.slots[b, h]
                np.testing.assert_array_equal(np.sort(got[got >= 0]), np.sort(idx.pages_to_positions(h, pages[h])))
    c.release(list(seqs))
    c.sync()


def test_prefix_sharing_equals_rebuilding_from_scratch(ix):
    rng = np.random.default_rng(2)
    c = ix.client
    prefix = rng.permutation(S)[:600]
    turn2 = rng.permutation(np.setdiff1d(np.arange(S), prefix))[:50]
    c.build(1, range(L), prefix)
    c.share(1, 2, prefix.size)  # radix hit on the whole prefix: nothing re-indexed
    c.insert(2, range(L), turn2)
    c.build(3, range(L), prefix)  # the same state built from scratch
    c.insert(3, range(L), turn2)
    c.sync()
    st = c.stats()
    assert st.copies == L and st.shares >= 1  # copy-on-write at turn 2's first insert, one per layer
    q = rng.standard_normal((2, H * GROUP, D)).astype(np.float32)
    for layer in range(L):
        a = c.query(layer, [2, 3], q[[0, 0]], 8)
        np.testing.assert_array_equal(a.pages[0], a.pages[1])
        np.testing.assert_array_equal(a.slots[0], a.slots[1])
        src = c.query(layer, [1], q[:1], 8)  # the source is untouched by the share and the insert
        assert src.n_tokens == [600] and not np.isin(src.slots, turn2).any()

    # a partial hit that cuts most of the source rebuilds the prefix: equal to building it fresh
    c.share(1, 4, 200)
    c.build(5, range(L), prefix[:200])
    # a partial hit that cuts a small tail copies and deletes: the tail never comes back
    c.share(1, 6, 590)
    c.sync()
    for layer in range(L):
        a = c.query(layer, [4, 5, 6], q[[0, 0, 1]], 8)
        np.testing.assert_array_equal(a.pages[0], a.pages[1])
        np.testing.assert_array_equal(a.slots[0], a.slots[1])
        assert a.n_tokens == [200, 200, 590]
        assert not np.isin(a.slots[2], prefix[590:]).any()
    c.release([1, 2, 3, 4, 5, 6])
    c.sync()
    assert c.stats().layer_entries == 0


def test_pipelined_queries_are_matched_by_id(ix):
    rng = np.random.default_rng(3)
    c = ix.client
    c.build(11, range(L), rng.permutation(S)[:500])
    c.build(12, range(L), rng.permutation(S)[:300])
    qs = rng.standard_normal((4, L, 2, H * GROUP, D)).astype(np.float32)
    rids = [[c.query_async(layer, [11, 12], qs[step, layer], 5) for layer in range(L)] for step in range(4)]
    got = {(s, l): c.query_result(rids[s][l]) for s in reversed(range(4)) for l in reversed(range(L))}
    for (s, l), sel in got.items():
        ref = c.query(l, [11, 12], qs[s, l], 5)
        np.testing.assert_array_equal(sel.pages, ref.pages)
        np.testing.assert_array_equal(sel.slots, ref.slots)
    c.release([11, 12])
    c.sync()


def test_fuzzed_and_truncated_messages_get_errors_and_serving_continues(ix):
    rng = np.random.default_rng(4)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ix.config.endpoint)
    errors_before = ix.client.stats().errors
    sent = 0
    for frames in fuzzed_messages(rng, 300, D):
        sock.send_multipart(frames)
        sent += 1
    replies = []
    while len(replies) < sent and sock.poll(10000):
        replies.append(p.decode_reply(sock.recv_multipart())[0])
    sock.close(0)
    assert len(replies) == sent  # every message got an answer
    assert all(not r.ok and r.code for r in replies)  # and none was accepted (seq -7 is unknown anyway)
    assert ix.process.is_alive()
    st = ix.client.stats()
    assert st.errors - errors_before == sent
    assert ix.client.ping().pid == ix.process.pid


def test_deadline_gives_a_fallback_not_a_hang_and_restart_rebuilds(ix):
    rng = np.random.default_rng(5)
    c = ix.client
    slots = rng.permutation(S)[:400]
    c.build(21, range(L), slots)
    c.sync()
    q = rng.standard_normal((1, H * GROUP, D)).astype(np.float32)
    before = c.query(1, [21], q, 6)
    assert not before.fallback

    os.kill(ix.process.pid, signal.SIGSTOP)  # a stuck indexer
    try:
        t0 = time.monotonic()
        sel = c.query(1, [21], q, 6, timeout_s=0.3)
        assert time.monotonic() - t0 < 2.0
        assert sel.fallback and "no reply" in sel.reason and c.counters.fallbacks >= 1
        assert (sel.pages == -1).all()
        newest = slots[-(slots.size % C or C):]  # fallback = most recent indexed pages, newest first
        np.testing.assert_array_equal(sel.slots[0, :, 0, : newest.size], np.stack([newest] * H))
        np.testing.assert_array_equal(sel.slots[0, 0, 1], slots[-(slots.size % C or C) - C: -(slots.size % C or C)])
    finally:
        os.kill(ix.process.pid, signal.SIGCONT)
    late = c.counters.late_replies
    assert not c.query(1, [21], q, 6).fallback  # serving again; the stale reply was dropped
    assert c.counters.late_replies == late + 1

    os.kill(ix.process.pid, signal.SIGKILL)  # a crashed indexer
    _wait_exit(ix.process.pid)
    sel = c.query(1, [21], q, 6, timeout_s=0.5)
    assert sel.fallback
    assert ix.restart() >= 1  # the ledger's builds replayed into a fresh process
    after = c.query(1, [21], q, 6)
    assert not after.fallback
    np.testing.assert_array_equal(after.pages, before.pages)
    np.testing.assert_array_equal(after.slots, before.slots)
    c.release([21])
    c.sync()


def test_random_operations_leave_nothing_behind(ix, local):
    """1000 random build / insert / query / share / release operations across 32 sequences, mirrored in
    process: every query answer matches, and after releasing everything no entry is left."""
    rng = np.random.default_rng(6)
    c = ix.client
    c.reset()
    c.sync()
    free = list(rng.permutation(S))
    known: dict[int, int] = {}  # seq -> tokens sent (all layers)

    def take(n):
        out = [free.pop() for _ in range(min(n, len(free)))]
        return np.asarray(out, np.int64)

    rid = 0
    for step in range(1000):
        rid += 1
        r = rng.random()
        seq = int(rng.integers(0, 32))
        if r < 0.15 or not known:
            slots = take(int(rng.integers(20, 300)))
            op, arr = p.Build(seq=seq, layers=list(range(L))), {"slots": slots.astype(np.int32)}
            c.build(seq, range(L), slots)
            known[seq] = slots.size
        elif r < 0.40 and seq in known:
            slots = take(int(rng.integers(1, 20)))
            op, arr = p.Insert(seq=seq, layers=list(range(L))), {"slots": slots.astype(np.int32)}
            c.insert(seq, range(L), slots)
            known[seq] += slots.size
        elif r < 0.50 and known:
            src = int(rng.choice(list(known)))
            if src == seq:
                continue
            keep = int(rng.integers(0, known[src] + 10))
            op, arr = p.Share(src=src, dst=seq, prefix_len=keep), None
            c.share(src, seq, keep)
            known[seq] = min(keep, known[src])
        elif r < 0.60 and known:
            victims = [int(s) for s in rng.choice(list(known), size=min(len(known), 2), replace=False)]
            op, arr = p.Release(seqs=victims), None
            c.release(victims)
            for v in victims:
                known.pop(v)
        else:
            batch = [int(s) for s in rng.choice(list(known), size=min(len(known), int(rng.integers(1, 9))),
                                                replace=False)]
            layer = int(rng.integers(0, L))
            q = rng.standard_normal((len(batch), H * GROUP, D)).astype(np.float32)
            sel = c.query(layer, batch, q, 4)
            res, out = local_call(local, rid, p.Query(layer=layer, seqs=batch, n_pages=4), {"q": q})
            assert not sel.fallback
            np.testing.assert_array_equal(sel.pages, out["pages"])
            np.testing.assert_array_equal(sel.slots, out["slots"])
            assert sel.n_tokens == res.n_tokens == [known[s] for s in batch]
            continue
        local_call(local, rid, op, arr)
        if step % 50 == 0:
            c.sync()
    c.sync()
    c.release(list(range(32)))
    c.sync()
    st = c.stats()
    assert (st.sequences, st.layer_entries, st.indexes, st.tokens, st.index_bytes, st.state_slots) == (0,) * 6
    assert st.shares > 20 and st.copies > 0 and st.queries > 100
    assert not c.ledger.seqs


def test_the_indexer_does_not_import_the_parents_main_module(tmp_path):
    """multiprocessing's spawn imports the parent's ``__main__`` again in the child; in SGLang's scheduler that
    is ``sglang.launch_server`` (torch and SGLang: most of the indexer's start-up time). A main module that
    records every import of itself must be imported once, by the parent only."""
    log = tmp_path / "imports.txt"
    script = tmp_path / "parent_main.py"
    script.write_text(
        "import os\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n"
        "if __name__ == '__main__':\n"
        "    from icecache_sglang.indexer import Indexer\n"
        "    with Indexer.launch(num_layers=1, num_kv_heads=1, head_dim=16, num_slots=64, timeout_s=10.0) as ix:\n"
        "        print(os.getpid(), ix.process.pid)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    parent, child = out.stdout.split()
    assert log.read_text().split() == [parent]  # not [parent, child]
