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
