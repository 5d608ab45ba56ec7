"""The backend's extend attention (new tokens' rows only) against SGLang's torch_native extend, which
re-runs the whole sequence: same outputs for fresh prefills, one-token prefix hits and multi-token chunks
after a prefix, in one mixed batch with GQA and scattered KV slots."""

from __future__ import annotations

import pytest
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from icecache_sglang.runtime.attention.extend import extend_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_matches_sglang_torch_native(dtype):
    g = torch.Generator().manual_seed(0)
    Hq, H, d, slots = 6, 2, 16, 256
    reqs = [(0, 5), (20, 1), (13, 4), (0, 1), (40, 0)]  # (prefix, new tokens); the last one adds nothing
    k_cache = torch.randn(slots, H, d, generator=g).to(dtype)
    v_cache = torch.randn(slots, H, d, generator=g).to(dtype)
    perm = torch.randperm(slots, generator=g)
    req_to_token = torch.zeros(8, 64, dtype=torch.int64)
    used = 0
    for i, (p, n) in enumerate(reqs):
        req_to_token[i + 2, :p + n] = perm[used:used + p + n]  # rows 2.. : the batch does not start at row 0
        used += p + n
    n_new = sum(n for _, n in reqs)
    q = torch.randn(n_new, Hq, d, generator=g).to(dtype)
    args = (k_cache, v_cache, req_to_token, torch.arange(2, 2 + len(reqs)),
            torch.tensor([p + n for p, n in reqs]), torch.tensor([p for p, _ in reqs]),
            torch.tensor([n for _, n in reqs]))
    ours = extend_attention(q, torch.full_like(q, float("nan")), *args, scale=0.3, enable_gqa=True)
    ref = TorchNativeAttnBackend._run_sdpa_forward_extend(None, q, torch.zeros_like(q), *args, scaling=0.3,
                                                          enable_gqa=True, causal=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)
    # and against the definition: query i of a request sees keys [0, prefix + i]
    start = 0
    for i, (p, n) in enumerate(reqs):
        for j in range(n):
            s = req_to_token[i + 2, :p + j + 1]
            k, v = k_cache[s].float(), v_cache[s].float()  # [t, H, d]
            for h in range(Hq):
                w = torch.softmax((k[:, h // (Hq // H)] @ q[start + j, h].float()) * 0.3, 0)
                torch.testing.assert_close(ours[start + j, h].float(), w @ v[:, h // (Hq // H)], atol=tol, rtol=tol)
        start += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_after_a_prefix_takes_the_fused_path_and_equals_the_masked_one(dtype):
    """A long prompt's second and later chunks: two fused passes (the prefix, then the chunk causally) merged
    by their log-sum-exps, not the unfused masked call (2x slower per layer at 8192 + 8192 tokens)."""
    from torch.nn.functional import scaled_dot_product_attention

    from icecache_sglang.runtime.attention.extend import _prefix_then_causal

    g = torch.Generator().manual_seed(1)
    P, n, Hq, H, d = 300, 70, 4, 2, 32
    q = torch.randn(1, Hq, n, d, generator=g).to(dtype)
    k = torch.randn(1, H, P + n, d, generator=g).to(dtype)
    v = torch.randn(1, H, P + n, d, generator=g).to(dtype)
    fused = _prefix_then_causal(q, k, v, P, 0.2)
    assert fused is not None and fused.dtype == dtype  # this torch has the fused CPU kernel
    pos = torch.arange(P + n)
    mask = pos[None, :] <= (P + torch.arange(n))[:, None]
    ref = scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.2, enable_gqa=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.float(), ref, atol=tol, rtol=tol)
