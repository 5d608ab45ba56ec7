"""IceCache's KV pool (``runtime/pool/kv_pool.py``): in host memory, the anchor layers' K planes are the
indexer's key store, so the model's KV write is the write the indexer reads (one copy of the keys)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from icecache_sglang.indexer.launcher import Indexer
from icecache_sglang.runtime.config import ENV_VAR, IceCacheConfig

pytest.importorskip("sglang")
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402

from icecache_sglang.runtime.pool import IceCacheKVPool, shared_key_store  # noqa: E402

LAYERS, H, D, SIZE = 5, 2, 8, 64


def make_pool(monkeypatch, dtype, cfg: IceCacheConfig | None):
    if cfg is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, cfg.to_json())
    return IceCacheKVPool(SIZE, page_size=1, dtype=dtype, head_num=H, head_dim=D, layer_num=LAYERS, device="cpu",
                          enable_memory_saver=False)


def store_keys(store, i: int, slots: np.ndarray, dtype) -> torch.Tensor:
    raw = torch.from_numpy(np.array(store.keys[i, slots]))
    return raw.view(torch.int16).view(torch.bfloat16) if dtype == torch.bfloat16 else raw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_anchor_key_planes_are_the_key_store(monkeypatch, dtype):
    cfg = IceCacheConfig(dense_layers=1, layer_reuse=2)
    pool = make_pool(monkeypatch, dtype, cfg)
    try:
        assert pool.anchors == cfg.anchor_layers(LAYERS) == [1, 3]
        store, pdir = shared_key_store(pool)
        assert store.spec.shape == (2, SIZE + 1, H, D) and os.path.dirname(store.spec.path) == str(pdir.path)
        g = torch.Generator().manual_seed(0)
        loc = torch.tensor([3, 9, 17, 40])
        for layer in range(LAYERS):
            k = torch.randn(len(loc), H, D, generator=g).to(dtype)
            v = torch.randn(len(loc), H, D, generator=g).to(dtype)
            pool.set_kv_buffer(SimpleNamespace(layer_id=layer), loc, k, v)
            assert torch.equal(pool.get_key_buffer(layer)[loc], k) and torch.equal(pool.get_value_buffer(layer)[loc], v)
            if layer in pool.anchors:  # the write landed in the store, bit for bit
                assert torch.equal(store_keys(store, pool.anchors.index(layer), loc.numpy(), dtype), k)
        # only anchor layers live in the store; values never do
        assert all(np.any(store.keys[i]) for i in range(2))
        shm = {pool.get_key_buffer(a).data_ptr() for a in pool.anchors}
        assert shm == {store.keys[i].ctypes.data for i in range(2)}
        others = [pool.get_key_buffer(layer).data_ptr() for layer in (0, 2, 4)]
        others += [pool.get_value_buffer(layer).data_ptr() for layer in range(LAYERS)]
        assert not shm & set(others)
    finally:
        shared_key_store(pool)[0].close()
        shared_key_store(pool)[1].cleanup()


def test_without_icecache_the_pool_is_the_in_tree_one(monkeypatch):
    pool = make_pool(monkeypatch, torch.bfloat16, None)
    assert shared_key_store(pool) is None
    ref = MHATokenToKVPool(SIZE, page_size=1, dtype=torch.bfloat16, head_num=H, head_dim=D, layer_num=LAYERS,
                           device="cpu", enable_memory_saver=False)
    assert [t.shape for t in pool.k_buffer] == [t.shape for t in ref.k_buffer]


def test_the_indexer_reads_keys_the_pool_wrote(monkeypatch):
    """An indexer launched on the pool's store builds from the keys the KV write put there: its exact
    selection ranks the slot whose key matches the query first."""
    cfg = IceCacheConfig(dense_layers=0, layer_reuse=1, page_size=4, budget_tokens=96, sink_tokens=0,
                         window_tokens=0)
    pool = make_pool(monkeypatch, torch.float32, cfg)
    store, pdir = shared_key_store(pool)
    with Indexer.launch(num_layers=LAYERS, num_kv_heads=H, head_dim=D, num_slots=SIZE + 1, key_dtype="float32",
                        index=cfg.index_config(), threads=1, timeout_s=30.0, store=store, private_dir=pdir) as ind:
        assert ind.store is store
        g = torch.Generator().manual_seed(1)
        slots = np.arange(1, 49)
        k = torch.randn(len(slots), H, D, generator=g) * 0.1
        target = 37  # slot whose keys point at the query
        q = torch.randn(H, D, generator=g)
        k[slots == target] = 4 * q / q.norm()
        for layer in range(LAYERS):
            pool.set_kv_buffer(SimpleNamespace(layer_id=layer), torch.from_numpy(slots), k, torch.zeros_like(k))
        ind.client.build(1, list(range(LAYERS)), slots)
        ind.client.sync(timeout_s=60.0)
        sel = ind.client.query(LAYERS - 1, [1], q.numpy()[None], 1, timeout_s=60.0, policy="exact")
        got = sel.slots[0].reshape(H, -1)
        assert all(target in got[h] for h in range(H)), got
    assert not os.path.exists(pdir.path)  # the indexer took over the store and its directory


def test_a_store_of_the_wrong_shape_is_refused(monkeypatch):
    pool = make_pool(monkeypatch, torch.float32, IceCacheConfig(dense_layers=1, layer_reuse=2))
    store, pdir = shared_key_store(pool)
    try:
        with pytest.raises(ValueError, match="does not match"):
            Indexer.launch(num_layers=4, num_kv_heads=H, head_dim=D, num_slots=SIZE + 1, key_dtype="float32",
                           store=store, private_dir=pdir)
    finally:
        store.close()
        pdir.cleanup()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_pool_that_keeps_its_keys_copies_a_decode_step_once(tmp_path, dtype):
    """A pool that keeps its own keys (on a GPU: device memory) has its anchor layers' new keys copied into the
    store (``runtime/key_writes.py``): a prefill chunk's at once, a decode step's staged per layer and written
    by one flush; nothing reaches the store before the flush, and a batch with other slots flushes first."""
    from icecache_sglang.indexer.keystore import KeyStore
    from icecache_sglang.runtime.key_writes import KeyStoreWriter

    pool = MHATokenToKVPool(SIZE, page_size=1, dtype=dtype, head_num=H, head_dim=D, layer_num=LAYERS, device="cpu",
                            enable_memory_saver=False)
    store = KeyStore.create(str(tmp_path), 2, SIZE + 1, H, D, "bfloat16" if dtype == torch.bfloat16 else "float32")
    try:
        writer = KeyStoreWriter(pool, store, {1: 0, 3: 1}, shared=False)
        g = torch.Generator().manual_seed(2)

        def model_writes(loc):
            for layer in range(LAYERS):
                k = torch.randn(len(loc), H, D, generator=g).to(dtype)
                pool.set_kv_buffer(SimpleNamespace(layer_id=layer), loc, k, torch.zeros_like(k))

        prefill = torch.arange(1, 9)
        model_writes(prefill)
        for layer in range(LAYERS):
            writer.write_now(layer, prefill)
        for layer, i in ((1, 0), (3, 1)):
            assert torch.equal(store_keys(store, i, prefill.numpy(), dtype), pool.get_key_buffer(layer)[prefill])
        step = torch.tensor([20, 31])
        model_writes(step)
        for layer in range(LAYERS):
            writer.stage(layer, step)
        assert not np.any(store.keys[:, step.numpy()])  # staged, not yet written
        writer.flush()
        for layer, i in ((1, 0), (3, 1)):
            assert torch.equal(store_keys(store, i, step.numpy(), dtype), pool.get_key_buffer(layer)[step])
        first, nxt = torch.tensor([41, 42]), torch.tensor([44])
        model_writes(first)
        model_writes(nxt)
        writer.stage(1, first)
        writer.stage(1, nxt)  # other slots: the first batch is written before this one is staged
        assert np.any(store.keys[0, first.numpy()]) and not np.any(store.keys[0, nxt.numpy()])
        assert torch.equal(store_keys(store, 0, first.numpy(), dtype), pool.get_key_buffer(1)[first])
        writer.flush()
        assert torch.equal(store_keys(store, 0, nxt.numpy(), dtype), pool.get_key_buffer(1)[nxt])
        shared = KeyStoreWriter(pool, store, {1: 0}, shared=True)  # the pool's planes are the store: no copies
        shared.stage(1, torch.tensor([50]))
        shared.write_now(1, torch.tensor([51]))
        shared.flush()
        assert not np.any(store.keys[:, [50, 51]])
    finally:
        store.close()
