"""The wire protocol and the request handling, in process: every refusal is an error reply with a code,
and the service keeps serving afterwards."""

import msgspec
import numpy as np
import pytest

from icecache_sglang.index.config import IndexConfig
from icecache_sglang.index.paged_index import PagedDCIIndex
from icecache_sglang.indexer import protocol as p
from icecache_sglang.indexer.config import IndexerConfig
from icecache_sglang.indexer.keystore import KeyStore, PrivateDir, sweep_stale
from icecache_sglang.indexer.dispatch import answer as _answer
from icecache_sglang.indexer.service import IndexerService

L, S, H, D, C = 2, 512, 2, 8, 4


@pytest.fixture
def service(tmp_path):
    store = KeyStore.create(str(tmp_path), L, S, H, D)
    store.keys[:] = np.random.default_rng(0).standard_normal(store.keys.shape).astype(np.float32)
    cfg = IndexerConfig(rank=0, store=store.spec, endpoint="ipc://" + str(tmp_path / "s"),
                        private_dir=str(tmp_path), index=IndexConfig(page_size=C), max_batch=4)
    yield IndexerService(cfg, store)
    store.close()


def ask(service, op, arrays=None, rid=7):
    reply, _ = _answer(service, p.encode_request(rid, op, arrays))
    return p.decode_reply([bytes(f) for f in reply])[0]


def test_round_trip_keeps_structs_and_arrays():
    q = np.arange(24, dtype=np.float32).reshape(1, 3, 8)
    frames = p.encode_request(5, p.Query(layer=1, seqs=[9], n_pages=3, fov=40), {"q": q})
    req, arrays = p.decode_request([bytes(f) for f in frames])
    assert req.v == p.PROTOCOL_VERSION and req.id == 5
    assert req.op == p.Query(layer=1, seqs=[9], n_pages=3, fov=40)
    np.testing.assert_array_equal(arrays["q"], q)


def test_no_pickle_on_the_wire():
    frames = p.encode_request(1, p.Build(seq=3, layers=[0]), {"slots": np.arange(4, dtype=np.int32)})
    assert not bytes(frames[0]).startswith(b"\x80")  # pickle protocol marker
    assert msgspec.msgpack.decode(bytes(frames[0]))["op"]["type"] == "Build"


def test_bfloat16_words_decode_exactly():
    x = np.array([1.5, -2.25, 3e-3], np.float32)
    words = (x.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(p.bfloat16_to_float32(words), (words.astype(np.uint32) << 16).view(np.float32))
    assert np.allclose(p.bfloat16_to_float32(words), x, rtol=1e-2)


@pytest.mark.parametrize("frames, code", [
    ([b"\xc1garbage"], "malformed"),
    ([msgspec.msgpack.encode({"v": p.PROTOCOL_VERSION + 1, "id": 3, "op": {"type": "Ping"}})], "version"),
    ([msgspec.msgpack.encode({"v": p.PROTOCOL_VERSION, "id": 3, "op": {"type": "Explode"}})], "bad_request"),
    ([msgspec.msgpack.encode({"v": p.PROTOCOL_VERSION, "id": 3, "op": {"type": "Build", "seq": "x",
                                                                         "layers": [0]}})], "bad_request"),
    ([msgspec.msgpack.encode({"v": p.PROTOCOL_VERSION, "id": 3})], "bad_request"),
    ([msgspec.msgpack.encode([1, 2, 3])], "malformed"),
    ([], "malformed"),
])
def test_undecodable_or_unknown_messages_get_error_replies(service, frames, code):
    reply, stop = _answer(service, frames)
    rep, _ = p.decode_reply([bytes(f) for f in reply])
    assert not rep.ok and rep.code == code and rep.error and not stop
    assert rep.id in (3, -1)
    assert ask(service, p.Ping()).result.num_kv_heads == H  # still serving


def _build(slots, seq=1, layers=(0,)):
    return p.Build(seq=seq, layers=list(layers)), {"slots": np.asarray(slots, np.int32)}


def test_bad_frames_and_out_of_range_values_are_refused(service):
    op, arrays = _build(np.arange(100))
    good = p.encode_request(1, op, arrays)
    cases = {
        "missing frame": good[:1],
        "extra frame": good + [b"1234"],
        "truncated frame": [good[0], bytes(good[1])[:-3]],
    }
    for name, frames in cases.items():
        rep, _ = p.decode_reply([bytes(f) for f in _answer(service, frames)[0]])
        assert not rep.ok and rep.code == "bad_array", name
    assert ask(service, *_build([0, S])).code == "out_of_range"
    assert ask(service, *_build([-1, 2])).code == "out_of_range"
    assert ask(service, *_build(np.arange(10), layers=[L])).code == "out_of_range"
    assert ask(service, *_build(np.arange(10), layers=[0, 0])).code == "bad_request"
    assert ask(service, *_build(np.arange(10), layers=[])).code == "bad_request"
    assert ask(service, p.Build(seq=1, layers=[0]), {"slots": np.zeros(3, np.float32)}).code == "bad_array"
    assert ask(service, p.Build(seq=1, layers=[0]), {"slots": np.zeros((3, 1), np.int32)}).code == "bad_array"
    assert ask(service, p.Build(seq=1, layers=[0])).code == "bad_array"
    assert ask(service, p.Share(src=99, dst=1, prefix_len=4)).code == "unknown_seq"
    assert service.stats().sequences == 0  # nothing half-done was kept

    assert ask(service, *_build(np.arange(100))).ok
    q = np.ones((1, 2 * H, D), np.float32)
    qry = p.Query(layer=0, seqs=[1], n_pages=2)
    assert ask(service, qry, {"q": q}).ok
    assert ask(service, p.Query(layer=0, seqs=[2], n_pages=2), {"q": q}).code == "unknown_seq"
    assert ask(service, p.Query(layer=L, seqs=[1], n_pages=2), {"q": q}).code == "out_of_range"
    assert ask(service, p.Query(layer=0, seqs=[1], n_pages=0), {"q": q}).code == "out_of_range"
    assert ask(service, p.Query(layer=0, seqs=[1] * 5, n_pages=2), {"q": np.ones((5, 2 * H, D), np.float32)}
               ).code == "out_of_range"  # max_batch=4
    assert ask(service, qry, {"q": np.ones((1, 3, D), np.float32)}).code == "bad_array"  # not a multiple of H
    assert ask(service, qry, {"q": np.ones((2, 2 * H, D), np.float32)}).code == "bad_array"
    assert ask(service, qry, {"q": np.ones((1, 2 * H, D), np.int32)}).code == "bad_array"
    nan = ask(service, qry, {"q": np.full((1, 2 * H, D), np.nan, np.float32)})  # a model's overflow, not a bad
    assert nan.ok and service.stats().nonfinite_queries == 1  # message: answered with the recent pages, counted
    assert ask(service, p.Query(layer=0, seqs=[1], n_pages=2, prop_to_retrieve=2.0), {"q": q}).code == "bad_request"
    ok = ask(service, qry, {"q": q})
    assert ok.ok and ok.result.n_tokens == [100]
    st = service.stats()
    assert st.errors >= 20 and st.sequences == 1 and st.queries == 3  # (the NaN query answered)


def test_service_reply_matches_the_index(service):
    rng = np.random.default_rng(3)
    slots = rng.permutation(S)[:300]
    assert ask(service, *_build(slots, seq=4, layers=[1])).result.tokens == [300]
    q = rng.standard_normal((1, 2 * H, D)).astype(np.float32)
    _, arrays = p.decode_reply([bytes(f) for f in _answer(service, p.encode_request(
        2, p.Query(layer=1, seqs=[4], n_pages=5), {"q": q}))[0]])
    idx = PagedDCIIndex(H, D, config=IndexConfig(page_size=C))
    idx.build(service.store.read(1, slots), positions=slots)
    pages = idx.query(q[0], 5)
    np.testing.assert_array_equal(arrays["pages"][0], pages)
    for h in range(H):
        for j, pg in enumerate(pages[h]):
            got = arrays["slots"][0, h, j]
            np.testing.assert_array_equal(got[got >= 0], idx.pages_to_positions(h, [pg]))


def test_config_refuses_what_cannot_work(tmp_path):
    spec = KeyStore.create(str(tmp_path), 1, 4, 1, 2).spec
    ok = dict(rank=0, store=spec, endpoint="ipc:///tmp/x.sock", private_dir=str(tmp_path))
    assert IndexerConfig.from_json(IndexerConfig(**ok).to_json()) == IndexerConfig(**ok)
    for bad, word in ((dict(endpoint="tcp://127.0.0.1:5555"), "ipc://"), (dict(endpoint="ipc:///" + "x" * 120), "107"),
                      (dict(rank=-1), "rank"), (dict(threads=0), "threads"), (dict(max_batch=0), "max_batch")):
        with pytest.raises(ValueError, match=word):
            IndexerConfig(**{**ok, **bad})


def test_key_store_larger_than_free_space_is_refused(tmp_path):
    with pytest.raises(ValueError, match="GiB free"):
        KeyStore.create(str(tmp_path), 1024, 1 << 30, 8, 128)  # 4 PiB
    assert not list(tmp_path.iterdir())


def test_private_dir_is_0700_and_stale_dirs_are_swept(tmp_path):
    d = PrivateDir.create(str(tmp_path))
    import os
    import stat

    assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o700
    stale = tmp_path / "icecache-999999999-abc"
    stale.mkdir()
    (stale / "keys.shm").write_bytes(b"x")
    assert str(stale) in sweep_stale(str(tmp_path))
    assert not stale.exists() and os.path.isdir(d.path)  # ours (live pid) stays
    d.cleanup()
    assert not os.path.exists(d.path)


@pytest.mark.parametrize("key_dtype", ["bfloat16", "int8"])
def test_warmup_compiles_the_default_selection(tmp_path, key_dtype):
    """The indexer compiles (or loads) every numba function its first requests reach before it reports
    ready, the default selection's scan too (and an int8 index's rescoring from the store): in a fresh
    process, nothing else has compiled it."""
    import subprocess
    import sys

    code = f"""
import numpy as np
from icecache_sglang.index import gqa_merge, scan
from icecache_sglang.index.config import IndexConfig
from icecache_sglang.indexer.config import IndexerConfig
from icecache_sglang.indexer.keystore import KeyStore
from icecache_sglang.indexer.service import IndexerService
store = KeyStore.create({str(tmp_path)!r}, 1, 64, 2, 8, "bfloat16")
cfg = IndexerConfig(rank=0, store=store.spec, endpoint="ipc://x", private_dir={str(tmp_path)!r},
                    index=IndexConfig(page_size=4, key_dtype={key_dtype!r}))
assert not scan.page_maxima.signatures and not scan.rescore_pages.signatures
IndexerService(cfg, store).warmup()
print(len(scan.page_maxima.signatures), len(gqa_merge.merge_by_mass.signatures), len(scan.rescore_pages.signatures))
store.close()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    n_max, n_merge, n_rescore = map(int, out.stdout.split())
    assert n_max >= 1 and n_merge >= 1 and n_rescore == (1 if key_dtype == "int8" else 0)
