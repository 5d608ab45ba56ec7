"""The Triton kernels against their torch references (CUDA when present, else Triton's interpreter on the
CPU, which is how CI runs them)."""

from __future__ import annotations

import pytest
import torch

from icecache_sglang.kernels import (
    copy_rows,
    copy_rows_reference,
    plan_indptr,
    plan_rows,
    plan_rows_reference,
    sparse_indptr,
    sparse_rows,
    sparse_rows_reference,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen():
    return torch.Generator(device=DEV).manual_seed(7)


@pytest.mark.parametrize("width, planes, dtype", [(40, 2, torch.float32), (128, 2, torch.bfloat16),
                                                  (200, 1, torch.float16)])
def test_copy_rows_gather_scatter_and_both(gen, width, planes, dtype):
    src = torch.randn(planes, 300, width, device=DEV, generator=gen).to(dtype)
    dst = torch.zeros(planes, 120, width, device=DEV, dtype=dtype)
    n = 70
    sr = torch.randint(0, 300, (n,), device=DEV, generator=gen)
    dr = torch.randperm(120, device=DEV, generator=gen)[:n].to(torch.int32)
    sr[5] = -1  # skipped
    dr[9] = -1  # skipped
    for s_idx, d_idx, m in ((sr, dr, n), (sr, None, n), (None, dr, n)):
        src_used = src if s_idx is not None else src[:, :120]
        got = copy_rows(src_used, dst.clone(), s_idx, d_idx, n=m)
        want = copy_rows_reference(src_used, dst.clone(), s_idx, d_idx, n=m)
        assert torch.equal(got, want)
    assert not torch.equal(copy_rows(src, dst.clone(), sr, dr), dst)  # it did write


def test_copy_rows_two_dimensional_and_strided_source(gen):
    src = torch.randn(500, 64, device=DEV, generator=gen)
    dst = torch.zeros(50, 64, device=DEV)
    sr = torch.randint(0, 500, (50,), device=DEV, generator=gen)
    assert torch.equal(copy_rows(src, dst.clone(), sr), copy_rows_reference(src, dst.clone(), sr))
    # interleaved [rows, 2, D] viewed as planes [2, rows, D] (the preload buffer's layout)
    inter = torch.randn(30, 2, 64, device=DEV, generator=gen)
    planes = inter.permute(1, 0, 2)
    out = torch.zeros(2, 40, 64, device=DEV)
    dr = torch.randperm(40, device=DEV, generator=gen)[:30]
    assert torch.equal(copy_rows(planes, out.clone(), None, dr), copy_rows_reference(planes, out.clone(), None, dr))


def test_copy_rows_count_from_a_device_scalar(gen):
    src = torch.randn(2, 64, 32, device=DEV, generator=gen)
    dst = torch.zeros(2, 64, 32, device=DEV)
    dr = torch.randperm(64, device=DEV, generator=gen)
    for k in (0, 1, 17, 64):
        n = torch.tensor([k], dtype=torch.int32, device=DEV)
        got = copy_rows(src, dst.clone(), None, dr, n=n, max_rows=64)
        assert torch.equal(got, copy_rows_reference(src, dst.clone(), None, dr, n=k))


def test_copy_rows_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        copy_rows(torch.zeros(2, 4, 8), torch.zeros(2, 4, 16))
    with pytest.raises(ValueError, match="max_rows"):
        copy_rows(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), n=torch.tensor([1], dtype=torch.int32))


@pytest.mark.parametrize("B, H, T", [(1, 1, 5), (3, 2, 37), (2, 8, 1500)])
def test_plan_rows_matches_reference(gen, B, H, T):
    slots = torch.randint(0, 10000, (B, H, T), device=DEV, generator=gen)
    valid = torch.rand(B, H, T, device=DEV, generator=gen) > 0.3
    valid[0, 0] = False  # an empty sequence
    ip = plan_indptr(valid)
    assert ip[-1] == valid.sum()
    assert torch.equal(plan_rows(slots, valid, ip).cpu(), plan_rows_reference(slots, valid).cpu())


@pytest.mark.parametrize("B, H, P, C, F", [(1, 1, 1, 2, 0), (3, 2, 5, 4, 9), (4, 8, 30, 16, 80)])
def test_sparse_rows_matches_reference(gen, B, H, P, C, F):
    fs = torch.randint(0, 5000, (B, max(F, 1)), device=DEV, generator=gen)
    fl = torch.randint(0, F + 1, (B,), device=DEV, generator=gen).to(torch.int32)
    bl = torch.randint(-1, 50, (B, H, P), device=DEV, generator=gen).to(torch.int32)
    fi = torch.randint(1, C + 1, (B, H, P), device=DEV, generator=gen).to(torch.int32)
    ip = sparse_indptr(fl, bl, fi)
    got = sparse_rows(fs, fl, bl, fi, ip, 40000, C)
    assert torch.equal(got.cpu(), sparse_rows_reference(fs, fl, bl, fi, 40000, C))
    # a launch for the first requests only (graph buffers are sized for the largest batch)
    b = max(1, B - 1)
    part = sparse_rows(fs, fl, bl, fi, ip, 40000, C, batch=b)
    assert torch.equal(part.cpu(), sparse_rows_reference(fs[:b], fl[:b], bl[:b], fi[:b], 40000, C))


@pytest.mark.parametrize("G, D, dtype, lens", [
    (4, 64, torch.float32, [37, 1, 300, 0, 64, 65]),        # one split each, a sequence without rows
    (2, 128, torch.bfloat16, [1200, 5, 513, 40]),            # several splits (512 rows), the last partly full
    (3, 40, torch.float16, [7, 700, 9, 1025, 2, 3]),         # group and head_dim not powers of two
])
def test_sparse_decode_matches_the_reference(gen, G, D, dtype, lens):
    """The Triton split-KV decode (``decode_attention: triton``) against the torch reference: B requests x H
    KV heads of index lists of any length (empty included), G query heads each, rows gathered from the
    layer's pool planes viewed as ``[rows, D]``."""
    from icecache_sglang.kernels import sparse_decode, sparse_decode_reference

    H = 2
    B = len(lens) // H
    slots = 2000
    k = torch.randn(slots, H, D, device=DEV, generator=gen).to(dtype)
    v = torch.randn(slots, H, D, device=DEV, generator=gen).to(dtype)
    q = torch.randn(B, H * G, D, device=DEV, generator=gen).to(dtype)
    counts = torch.tensor(lens, dtype=torch.int32)
    indptr = torch.nn.functional.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0)).to(DEV)
    heads = torch.arange(len(lens)) % H
    rows = torch.cat([torch.randint(0, slots, (n,), generator=torch.Generator().manual_seed(i)) * H + heads[i]
                      for i, n in enumerate(lens)]).to(torch.int32).to(DEV)
    scale = D ** -0.5
    got = sparse_decode(q, k, v, indptr, rows, scale, max(lens))
    want = sparse_decode_reference(q, k, v, indptr, rows, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert got.dtype == dtype
    # a grid sized for longer lists than there are (empty splits) changes nothing
    torch.testing.assert_close(sparse_decode(q, k, v, indptr, rows, scale, 3 * max(lens) + 700).float(),
                               got.float(), atol=tol, rtol=tol)


def test_triton_sparse_decode_path_equals_the_torch_path_on_a_planners_plan(gen):
    """``decode_attention: triton`` (``TritonSparseDecode``) against the torch path on the same plan, laid out
    as the planner lays it: sink + selected pages (-1 padded) + tail per (request, KV head), one request
    attending to every one of its 1300 tokens; a second layer sharing the plan reuses its offsets."""
    import numpy as np

    from icecache_sglang.runtime.attention import DecodePlan, TorchSparseDecode, TritonSparseDecode
    from icecache_sglang.runtime.plan import compact_of, full_layout

    H, G, D, slots = 2, 4, 64, 4000
    rng = np.random.default_rng(3)
    fixed = [(rng.choice(slots, 16, replace=False), rng.choice(slots, 20, replace=False)),
             (rng.choice(slots, 1300, replace=False), np.empty(0, np.int64)),
             (rng.choice(slots, 16, replace=False), rng.choice(slots, 3, replace=False))]
    picked = {b: np.where(rng.random((H, 96)) < 0.2, -1, rng.integers(0, slots, (H, 96))) for b in (0, 2)}
    s, valid = full_layout(fixed, picked, H)
    s[~valid] = 0
    tokens, indptr, rows = compact_of(s, valid, H)
    torch_plan = DecodePlan(torch.from_numpy(s).to(DEV), torch.from_numpy(valid).to(DEV))
    plan = DecodePlan(None, None, indptr=torch.from_numpy(indptr), rows=torch.from_numpy(rows).to(DEV),
                      tokens=torch.from_numpy(tokens))
    k = torch.randn(slots, H, D, device=DEV, generator=gen).to(torch.bfloat16)
    v = torch.randn(slots, H, D, device=DEV, generator=gen).to(torch.bfloat16)
    path = TritonSparseDecode()
    for layer in range(2):
        q = torch.randn(3, H * G, D, device=DEV, generator=gen).to(torch.bfloat16)
        want = TorchSparseDecode().decode(q, k, v, torch_plan, D ** -0.5)
        got = path.decode(q, k, v, plan, D ** -0.5)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
        assert path._planned[0] is plan and path._planned[2] == 1300


def test_split_rows_keeps_the_grid_within_the_gpu_and_covers_the_longest_list():
    """The Triton decode's split count: enough splits to fill the SMs with a few long lists, no more than a
    few programs per SM however long one list is (a request attending to all its 128k tokens beside sparse
    ones used to give every sequence 256 splits), and the splits always cover the longest list."""
    from icecache_sglang.kernels.sparse_decode import MIN_SPLIT_ROWS, SPLITS_PER_SM, split_rows

    for longest in (1, 31, 300, 4096, 131072, 1 << 20):
        for seqs in (8, 64, 256, 4096):
            n, split = split_rows(longest, seqs, 132, 32)
            assert n * split >= longest and (n - 1) * split < longest  # covered, no split wholly past it
            assert split % 32 == 0 and (split >= MIN_SPLIT_ROWS or n == 1)
            assert n <= max(1, SPLITS_PER_SM * 132 // seqs)
    assert split_rows(131072, 8, 132, 32)[0] == SPLITS_PER_SM * 132 // 8  # one long request: the SMs filled
