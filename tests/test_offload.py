"""The GPU path's host side and its whole layer step, on the CPU: the hot-page map (hits, dirty pages, LRU
victims), the page loader (bulk gather + copy + scatter, and direct UVA-style reads), and one layer's
offloaded decode step against exact attention over the same tokens, step after step. With CUDA and
flashinfer present, the FlashInfer paths are checked too (benchmarks/gpu/gpu_path.py does more)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icecache_sglang.runtime.attention import (
    DecodePlan,
    TorchSparseDecode,
    decode_attention_for,
    flashinfer_importable,
    rows_decode_reference,
)
from icecache_sglang.runtime.offload import HotPageMap, OffloadedDecodeLayer, PageLoader, StepInputs

C = 4
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton kernels run in the interpreter


def sel(pages, fills, base=0):
    """[1, P] page ids and [1, P, C] slots: page p's tokens are slots base + 10*p + t, t < fill."""
    pages = np.array([pages], np.int64)
    slots = np.full((1, pages.shape[1], C), -1, np.int64)
    for j, (p, f) in enumerate(zip(pages[0], fills)):
        slots[0, j, :f] = base + 10 * p + np.arange(f)
    return pages, slots


def test_hot_map_hits_reuse_blocks_and_only_misses_travel():
    m = HotPageMap(n_lanes=4, cap=3, page_size=C, n_kv_heads=2, hot_base=1000)
    lanes, heads = np.array([1]), np.array([1])
    a = m.assign(lanes, heads, *sel([5, 7], [4, 2]))
    assert (a.hits, a.misses) == (0, 2)
    # rows: host row slot*H + h, device row hot_base + block*C + t; block ids are lane*cap + j
    assert a.src_rows.tolist() == [(50 + t) * 2 + 1 for t in range(4)] + [(70 + t) * 2 + 1 for t in range(2)]
    assert set(a.blocks[0] // 3) == {1}
    assert a.dst_rows.tolist() == [1000 + a.blocks[0, 0] * C + t for t in range(4)] + \
        [1000 + a.blocks[0, 1] * C + t for t in range(2)]
    assert a.fills.tolist() == [[4, 2]]
    b = m.assign(lanes, heads, *sel([7, 5], [2, 4]))
    assert (b.hits, b.misses, len(b.src_rows)) == (2, 0, 0)
    assert b.blocks.tolist() == [[a.blocks[0, 1], a.blocks[0, 0]]]


def test_hot_map_reloads_a_dirty_page_and_evicts_least_recently_used():
    m = HotPageMap(n_lanes=1, cap=3, page_size=C, n_kv_heads=1)
    lanes, heads = np.array([0]), np.array([0])
    first = m.assign(lanes, heads, *sel([1, 2], [4, 4]))  # blocks: 1 -> x, 2 -> y, spare z
    m.assign(lanes, heads, *sel([3, 1], [4, 4]))  # 3 takes the spare (never used), 1 hits
    blk2 = first.blocks[0, 1]
    again = m.assign(lanes, heads, *sel([2, 1], [4, 4]))  # 2 is still resident
    assert again.hits == 2 and again.blocks[0, 0] == blk2
    # page 1's tokens changed (the index split it): same id, different slots -> loaded again
    pages, slots = sel([1, 2], [4, 4])
    slots[0, 0, 3] = -1
    dirty = m.assign(lanes, heads, pages, slots)
    assert (dirty.hits, dirty.misses) == (1, 1) and len(dirty.src_rows) == 3
    # now 4 arrives: the victim is the LRU block outside this step's selection, page 3's
    p3_block = [j for j in range(3) if m.res_page[0, j] == 3][0]
    new = m.assign(lanes, heads, *sel([4, 2], [4, 4]))
    assert new.blocks[0, 0] == p3_block


def test_hot_map_reset_and_errors():
    m = HotPageMap(n_lanes=2, cap=2, page_size=C, n_kv_heads=1)
    lanes, heads = np.array([0]), np.array([0])
    m.assign(lanes, heads, *sel([1, 2], [4, 4]))
    m.reset(np.array([0]))
    assert m.assign(lanes, heads, *sel([1, 2], [4, 4])).hits == 0
    # the indexer's int32 selections match the same way
    assert m.assign(lanes, heads, *(x.astype(np.int32) for x in sel([1, 2], [4, 4]))).hits == 2
    with pytest.raises(ValueError, match="do not fit"):
        m.assign(lanes, heads, *sel([1, 2, 3], [4, 4, 4]))
    with pytest.raises(ValueError, match="twice"):
        m.assign(np.array([0, 0]), np.array([0, 0]), *[np.concatenate([x, x]) for x in sel([1], [4])])
    with pytest.raises(ValueError, match="beyond"):
        m.assign(np.array([5]), heads, *sel([1], [4]))


@pytest.mark.parametrize("mode", ["bulk", "uva"])
def test_page_loader_moves_exactly_the_rows(mode, monkeypatch):
    from icecache_sglang.runtime.offload import loader as loader_module

    monkeypatch.setattr(loader_module, "CHUNK_ROWS", 16)  # several gather/copy chunks per step
    g = torch.Generator().manual_seed(0)
    host = torch.randn(2, 500, 16, generator=g).to(torch.bfloat16)
    if DEV == "cuda":
        host = host.pin_memory()  # the UVA loader reads it from the GPU
    dev = torch.zeros(2, 300, 16, dtype=torch.bfloat16, device=DEV)
    loader = PageLoader(mode, max_rows=64, head_dim=16, dtype=torch.bfloat16, device=DEV)
    rng = np.random.default_rng(0)
    for n in (40, 0, 64, 3):
        src = rng.integers(0, 500, n)
        dst = rng.permutation(300)[:n]
        want = dev.cpu()
        want[:, dst] = host[:, src]
        assert loader.load(host, dev, src, dst) == n
        assert torch.equal(dev.cpu(), want)
    with pytest.raises(ValueError, match="exceed"):
        loader.stage(host, np.zeros(65, np.int64), np.zeros(65, np.int64))
    with pytest.raises(ValueError, match="unknown page loading mode"):
        PageLoader("dma", 4, 16, torch.float32, "cpu")


def test_rows_reference_equals_torch_sparse_decode():
    g = torch.Generator().manual_seed(1)
    B, H, G, D, S, T = 2, 2, 3, 8, 50, 12
    k, v = torch.randn(S, H, D, generator=g), torch.randn(S, H, D, generator=g)
    q = torch.randn(B, H * G, D, generator=g)
    slots = torch.randint(0, S, (B, H, T), generator=g)
    valid = torch.rand(B, H, T, generator=g) > 0.3
    valid[..., 0] = True
    rows = (slots * H + torch.arange(H).view(1, H, 1))[valid].to(torch.int32)
    indptr = torch.nn.functional.pad(valid.reshape(-1, T).sum(-1).cumsum(0), (1, 0)).to(torch.int32)
    got = rows_decode_reference(q, k.reshape(-1, D), v.reshape(-1, D), indptr, rows, D ** -0.5)
    want = TorchSparseDecode().decode(q, k, v, DecodePlan(slots, valid), D ** -0.5)
    torch.testing.assert_close(got, want)


def _plan_of(fixed, fl, slots, B, H, width):
    ps = np.zeros((B, H, width), np.int64)
    pv = np.zeros((B, H, width), bool)
    for b in range(B):
        for h in range(H):
            s = list(fixed[b, : fl[b]]) + [x for x in slots[b, h].reshape(-1) if x >= 0]
            ps[b, h, : len(s)] = s
            pv[b, h, : len(s)] = True
    return DecodePlan(torch.from_numpy(ps), torch.from_numpy(pv))


@pytest.mark.parametrize("mode", ["bulk", "uva"])
def test_offloaded_layer_step_equals_exact_attention_over_its_tokens(mode):
    """Several steps of changing selections (partly filled pages, pages kept across steps): the hot cache
    serves kept pages without copying, and every step equals exact attention over sink + tail + pages read
    from the host copy of the KV."""
    rng = np.random.default_rng(3)
    S, H, G, D, P, F, B = 400, 2, 3, 16, 5, 6, 3
    layer = OffloadedDecodeLayer(max_batch=4, n_kv_heads=H, group=G, head_dim=D, page_size=C, max_pages=P,
                                 max_fixed=F, pool_slots=S, cache_blocks=8, n_req_rows=8, dtype=torch.float32,
                                 device=DEV, loader_mode=mode, use_flashinfer=False)
    host = torch.randn(2, S * H, D, generator=torch.Generator().manual_seed(3))
    if DEV == "cuda":
        host = host.pin_memory()
    layer.pool.copy_(host.view(2, S, H, D))  # sink and tail tokens live in the device pool
    layer.kv[:, layer.hot_base:] = 1e4  # the hot region holds nothing until loaded
    kv = host.view(2, S, H, D)
    hits = 0
    prev = None
    for step in range(5):
        pages = np.full((B, H, P), -1, np.int64)
        slots = np.full((B, H, P, C), -1, np.int64)
        for b in range(B):
            for h in range(H):
                ids = rng.choice(12, size=P - (b + h) % 2, replace=False)
                if prev is not None:
                    ids[:2] = prev[b, h, :2]  # two pages kept from the last step
                    ids = np.unique(ids)
                for j, pg in enumerate(ids):
                    pages[b, h, j] = pg
                    f = C if pg % 3 else 2
                    slots[b, h, j, :f] = (b * 97 + pg * 11 + h * 3) % (S - C) + np.arange(f)
        prev = pages
        fl = np.array([6, 2, 4])
        fixed = np.full((B, F), -1, np.int64)
        for b in range(B):
            fixed[b, : fl[b]] = rng.choice(S, fl[b], replace=False)
        q = torch.randn(B, H * G, D, generator=torch.Generator().manual_seed(step))
        out = layer.step(q.to(DEV), StepInputs(np.array([0, 3, 5]), fixed, fl, pages, slots), host).cpu()
        want = TorchSparseDecode().decode(q, kv[0], kv[1], _plan_of(fixed, fl, slots, B, H, F + P * C), D ** -0.5)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        hits += layer.last_stats.pages_hit
    assert hits >= 2 * B * H * 4 - 2  # kept pages were served from the hot cache


def test_decode_attention_setting():
    assert type(decode_attention_for("torch", torch.device("cpu"))).__name__ == "TorchSparseDecode"
    assert type(decode_attention_for("auto", torch.device("cpu"))).__name__ == "TorchSparseDecode"
    with pytest.raises(ValueError, match="CUDA"):
        decode_attention_for("flashinfer", torch.device("cpu"))


@pytest.mark.skipif(not (torch.cuda.is_available() and flashinfer_importable()), reason="needs CUDA and flashinfer")
def test_flashinfer_sparse_decode_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, G, D, S, T = 4, 8, 4, 128, 8192, 600
    k = torch.randn(S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(B, H * G, D, device="cuda", dtype=torch.bfloat16, generator=g)
    plan = DecodePlan(torch.randint(0, S, (B, H, T), device="cuda", generator=g),
                      torch.rand(B, H, T, device="cuda", generator=g) > 0.2)
    got = decode_attention_for("flashinfer", torch.device("cuda")).decode(q, k, v, plan, D ** -0.5).float()
    want = TorchSparseDecode().decode(q.float(), k.float(), v.float(), plan, D ** -0.5)
    assert (got - want).abs().max() < 2e-2
