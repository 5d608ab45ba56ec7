"""Prefill from the host pool under offload (``runtime/pool/staging.py``): an extend batch's rows staged on the
device one layer at a time, attended there, give exactly the attention over SGLang's pool; the host pool's
direct reads and writes (a GPU's Triton kernels over pinned memory: on a CUDA machine the real thing, host
memory registered with ``cudaHostRegister`` as the pool registers it; without one, Triton's interpreter)
move the same rows as plain indexing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang", reason="the staging imports SGLang's KV write locations (scripts/setup.sh)")

from icecache_sglang.runtime.attention.extend import extend_attention  # noqa: E402
from icecache_sglang.runtime.pool.device_pool import DeviceKVPool  # noqa: E402
from icecache_sglang.runtime.pool.kv_pool import register_host_memory, write_rows  # noqa: E402
from icecache_sglang.runtime.pool import staging as staging_mod  # noqa: E402
from icecache_sglang.runtime.pool.staging import PrefillStaging  # noqa: E402

Hq, H, D, SLOTS, ROWS, CTX = 4, 2, 8, 300, 6, 96
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the "device" side of the direct paths lives
_REGISTERED: list[torch.Tensor] = []  # registered host memory stays alive (and registered) for the session


def host_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` in host memory the GPU can reach, registered in place as the host-resident pool registers its planes
    (on a machine without a GPU, plain host memory)."""
    t = t.cpu().contiguous()
    if DEV == "cuda":
        register_host_memory(t.data_ptr(), t.numel() * t.element_size())
        _REGISTERED.append(t)
    return t


def host_pool(seed=0, layers=2):
    g = torch.Generator().manual_seed(seed)
    k = [torch.randn(SLOTS, H, D, generator=g) for _ in range(layers)]
    v = [torch.randn(SLOTS, H, D, generator=g) for _ in range(layers)]
    return SimpleNamespace(k_buffer=k, v_buffer=v, head_num=H, head_dim=D, v_head_dim=D, store_dtype=torch.float32,
                           dtype=torch.float32, get_key_buffer=lambda i: k[i], get_value_buffer=lambda i: v[i])


def batch(reqs, seed=1):
    """An extend batch: per request (req_to_token row, prefix, new tokens), scattered slots; a new token's
    slot is its out_cache_loc, its prefix's slots are in req_to_token."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(SLOTS - 1, generator=g) + 1
    r2t = torch.zeros(ROWS, CTX, dtype=torch.int32)
    used, out = 0, []
    for row, p, n in reqs:
        r2t[row, :p + n] = perm[used:used + p + n].to(torch.int32)
        out.append(r2t[row, p:p + n].long())
        used += p + n
    fb = SimpleNamespace(req_pool_indices=torch.tensor([r for r, _, _ in reqs]),
                         seq_lens=torch.tensor([p + n for _, p, n in reqs]), seq_lens_cpu=None,
                         extend_prefix_lens=torch.tensor([p for _, p, _ in reqs]), extend_prefix_lens_cpu=None,
                         extend_seq_lens=torch.tensor([n for _, _, n in reqs]), out_cache_loc=torch.cat(out))
    return fb, r2t


REQS = [(3, 0, 7), (1, 40, 5), (4, 17, 1), (0, 0, 1), (5, 60, 12)]  # fresh prompts, prefix hits, chunks


@pytest.mark.parametrize("direct", [False, True])
def test_staged_extend_attends_exactly_as_over_the_pool(direct):
    pool = host_pool()
    fb, r2t = batch(REQS)
    g = torch.Generator().manual_seed(2)
    n_new = int(fb.extend_seq_lens.sum())
    staging = PrefillStaging(pool, r2t, "cpu", ROWS, CTX)
    staging._direct = direct  # the Triton gather (a GPU's read of pinned host rows), on the CPU's interpreter
    st = staging.begin(fb, r2t)
    assert st.rows == int(fb.seq_lens.sum())
    for layer in range(2):
        k_new, v_new = torch.randn(n_new, H, D, generator=g), torch.randn(n_new, H, D, generator=g)
        q = torch.randn(n_new, Hq, D, generator=g)
        # what the backend does: the new tokens into the host pool, the prefix staged, the new tokens staged
        pool.k_buffer[layer][fb.out_cache_loc] = k_new
        pool.v_buffer[layer][fb.out_cache_loc] = v_new
        staging.load(st.prefix, pool.k_buffer[layer], pool.v_buffer[layer])
        staging.kv.set_kv_buffer(None, st.batch.out_cache_loc, k_new, v_new)
        args = (fb.seq_lens, fb.extend_prefix_lens, fb.extend_seq_lens)
        staged = extend_attention(q, torch.empty_like(q), staging.kv.get_key_buffer(layer),
                                  staging.kv.get_value_buffer(layer), staging.table.req_to_token,
                                  st.batch.req_pool_indices, *args, scale=0.3, enable_gqa=True)
        direct_ = extend_attention(q, torch.empty_like(q), pool.k_buffer[layer], pool.v_buffer[layer], r2t,
                                   fb.req_pool_indices, *args, scale=0.3, enable_gqa=True)
        assert torch.equal(staged, direct_)
    assert staging.rows_gathered == 2 * sum(p for _, p, _ in REQS)
    # a model that wrote its new tokens' KV into the pool itself: they are gathered like the prefix
    staging.kv.k.zero_()
    staging.load(st.new, pool.k_buffer[1], pool.v_buffer[1])
    assert torch.equal(staging.kv.k[st.batch.out_cache_loc.long()], pool.k_buffer[1][fb.out_cache_loc])


def test_staging_is_allocated_at_launch_and_fixed():
    """Device memory for prefill is allocated when the backend is built (``prefill_staging_tokens`` rows) and a
    batch within it uses it as is; one beyond it (admission keeps batches within: a hook that did not run)
    grows the buffer rather than failing the forward pass."""
    pool = host_pool()
    staging = PrefillStaging(pool, torch.zeros(ROWS, CTX, dtype=torch.int32), "cpu", ROWS, 40)
    fixed = staging.kv.nbytes
    assert fixed == 2 * 40 * H * D * 4 == staging.kv.nbytes_max
    small, r2t = batch([(0, 0, 5), (1, 20, 15)])
    staging.begin(small, r2t)
    assert staging.kv.nbytes == fixed
    big, r2t = batch(REQS)  # 101 rows
    staging.begin(big, r2t)
    assert staging.kv.nbytes == 2 * int(big.seq_lens.sum()) * H * D * 4 == staging.kv.nbytes_max


def test_the_staging_rows_hold_one_request_of_the_context_length():
    from icecache_sglang.runtime.config import IceCacheConfigError

    assert staging_mod.staging_rows(None, 4100) == 4100 and staging_mod.staging_rows(9000, 4100) == 9000
    with pytest.raises(IceCacheConfigError, match=r"prefill_staging_tokens \(4000\) cannot stage one request of "
                                                  r"the context length: the smallest working size is 4100"):
        staging_mod.staging_rows(4000, 4100)


def test_admission_keeps_an_extend_batch_within_the_staging_rows(monkeypatch):
    """``batch_fits``: what SGLang's prefill admission asks (``patches/admission.py``) for each request after
    the batch's first: its prefix and new tokens join the batch only within the staging rows."""
    monkeypatch.setattr(staging_mod, "_rows_limit", None)  # the module's limit is put back after the test
    PrefillStaging(host_pool(), torch.zeros(ROWS, CTX, dtype=torch.int32), "cpu", ROWS, 100)
    before = staging_mod.admission_deferrals()
    assert staging_mod.rows_limit() == 100
    assert staging_mod.batch_fits(0, 100) and staging_mod.batch_fits(0, 5000)  # a batch's first request runs
    assert staging_mod.batch_fits(60, 40) and not staging_mod.batch_fits(60, 41)
    assert staging_mod.admission_deferrals() == before + 1


def test_too_large_a_batch_is_refused():
    pool = host_pool()
    fb, r2t = batch(REQS)
    staging = PrefillStaging(pool, r2t[:3], "cpu", 3, CTX)
    with pytest.raises(RuntimeError, match="staging table"):
        staging.begin(fb, r2t)


def test_write_rows_puts_a_device_write_into_host_rows():
    g = torch.Generator().manual_seed(3)
    plane = host_tensor(torch.zeros(SLOTS, H, D))
    x = torch.randn(10, H, D, generator=g)
    loc = torch.randperm(SLOTS, generator=g)[:10]
    write_rows(x.to(DEV), plane, loc.to(DEV))  # a Triton kernel writing the host rows (interpreted without a GPU)
    if DEV == "cuda":
        torch.cuda.synchronize()
    want = torch.zeros(SLOTS, H, D)
    want[loc] = x
    assert torch.equal(plane, want)
    # a non-contiguous source (K split from a fused QKV projection): strided tokens, contiguous heads
    qkv = torch.randn(10, 3, H, D, generator=g)
    write_rows(qkv.to(DEV)[:, 1], plane, loc.to(DEV))
    if DEV == "cuda":
        torch.cuda.synchronize()
    want[loc] = qkv[:, 1]
    assert torch.equal(plane, want)


def test_staging_gathers_host_rows_onto_the_device():
    """The direct gather of the staging buffer from host memory the GPU reads (a real GPU where there is one)."""
    pool = host_pool()
    pool.k_buffer = [host_tensor(t) for t in pool.k_buffer]
    pool.v_buffer = [host_tensor(t) for t in pool.v_buffer]
    fb, r2t = batch(REQS)
    staging = PrefillStaging(pool, r2t.to(DEV), DEV, ROWS, CTX)
    staging._direct = True
    st = staging.begin(SimpleNamespace(**{k: (v.to(DEV) if isinstance(v, torch.Tensor) else v)
                                          for k, v in vars(fb).items()}), r2t.to(DEV))
    staging.load(st.prefix, pool.k_buffer[1], pool.v_buffer[1])
    if DEV == "cuda":
        torch.cuda.synchronize()
    dst, src = st.prefix.dst.cpu(), st.prefix.src.cpu()
    assert len(dst) == sum(p for _, p, _ in REQS)
    assert torch.equal(staging.kv.k[dst.to(DEV)].cpu(), pool.k_buffer[1][src])
    assert torch.equal(staging.kv.v[dst.to(DEV)].cpu(), pool.v_buffer[1][src])


def test_device_pool_reads_host_rows_directly_like_indexing():
    g = torch.Generator().manual_seed(4)
    hk, hv = host_tensor(torch.randn(SLOTS, H, D, generator=g)), host_tensor(torch.randn(SLOTS, H, D, generator=g))
    import numpy as np

    rng = np.random.default_rng(5)
    slots = np.stack([np.stack([rng.permutation(np.arange(1, SLOTS))[:20] for _ in range(H)]) for _ in range(2)])
    valid = slots >= 0
    pools = []
    for direct in (False, True):
        dp = DeviceKVPool(num_layers=1, groups={0: 0}, lanes=2, lane_rows=24, head_num=H, head_dim=D,
                          v_head_dim=D, dtype=torch.float32, device=DEV, num_slots=SLOTS)
        dp._direct = direct
        rows, misses = dp.map_plan(0, dp.lanes_for([7, 9]), slots, valid)
        assert (misses.src_dev is not None) == direct
        dp.load(0, misses, hk, hv)
        pools.append((rows, dp))
    (r0, a), (r1, b) = pools
    assert np.array_equal(r0, r1)
    assert torch.equal(a.k[0], b.k[0]) and torch.equal(a.v[0], b.v[0])
    rows = torch.from_numpy(r0[valid]).to(DEV)  # and the rows hold the host rows they name
    heads = torch.from_numpy(np.nonzero(valid)[1]).to(DEV)
    want = hk[torch.from_numpy(slots[valid]), torch.from_numpy(np.nonzero(valid)[1])]
    assert torch.equal(b.k[0][rows, heads].cpu(), want)


def test_the_dense_backend_reads_the_staging_table_through_sglangs_translator():
    """SGLang's Triton and FlashInfer backends build their read indices from the runner's KV index translator,
    not from ``req_to_token_pool``: the staging view's translator must read the staging table."""
    import copy

    from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator

    pool = host_pool()
    fb, r2t = batch(REQS)
    staging = PrefillStaging(pool, r2t, "cpu", ROWS, CTX)
    real = SimpleNamespace(req_to_token_pool=SimpleNamespace(req_to_token=r2t), token_to_kv_pool=pool, page_size=1,
                           kv_index_translator=KVIndexTranslator(req_to_token=r2t, token_to_kv_pool_allocator=None,
                                                                 token_to_kv_pool=pool, page_size=1, device="cpu"))
    view = staging.runner_view(real)
    st = staging.begin(fb, r2t)
    tr = view.kv_index_translator
    assert tr is not real.kv_index_translator and not tr.is_translating
    assert tr.req_to_token is staging.table.req_to_token and view.req_to_token_pool is staging.table
    table = tr.read_source(None, req_pool_indices=st.batch.req_pool_indices, bs=len(REQS))
    for i, (_, p, n) in enumerate(REQS):  # request i's positions are its staging rows
        rows = table.ids[table.row_ids[i], :p + n]
        assert rows.tolist() == list(range(int(rows[0]), int(rows[0]) + p + n)) if p + n else True
    assert view.page_size == 1  # the rest is the real runner's
    # the proxies copy without recursing through their own attributes
    copy.copy(view), copy.copy(staging.kv)


def test_offload_refuses_models_that_write_their_kv_from_their_rotary_kernel():
    import sys
    import types

    from icecache_sglang.runtime.backend import offload_model_problems

    mod = types.ModuleType("fake_fused_model")
    mod.enable_fused_set_kv_buffer = lambda fb: True
    sys.modules[mod.__name__] = mod
    try:
        Fused = type("FusedMoeForCausalLM", (), {"__module__": mod.__name__})
        Plain = type("LlamaForCausalLM", (), {"__module__": __name__})
        assert "fused set_kv_buffer" in offload_model_problems(SimpleNamespace(model=Fused()))[0]
        assert offload_model_problems(SimpleNamespace(model=Plain())) == []
    finally:
        del sys.modules[mod.__name__]
