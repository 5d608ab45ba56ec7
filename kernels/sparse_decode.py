"""Sparse decode attention over token-level index lists, planned on the device: no host plan per layer.

One decode "sequence" per (request, KV head), as FlashInfer's path lays it out (``decode_index.py``):
sequence ``bh = b * H + h`` attends the KV rows ``rows[indptr[bh] : indptr[bh + 1]]`` of the layer's
planes viewed as ``[rows, D]`` (row ``slot * H + h``), with the ``G`` query heads of its group. FlashInfer's
decode needs a host ``plan`` per index list (its split-KV schedule), at every anchor layer of every step;
these kernels take ``indptr`` on the device and a grid the caller sizes from the longest list it knows on the
host, so nothing is planned or read back per layer.

- :func:`sparse_decode`: split-KV in two launches. ``_split_kernel`` gives each (sequence, split of ``split``
  rows) an online softmax over its rows (running max, sum, weighted values in float32); ``_merge_kernel``
  combines a sequence's splits into the output, in ``q``'s dtype. A sequence shorter than its grid leaves
  empty splits, which the merge skips.
- :func:`sparse_decode_reference`: the same in torch, one sequence at a time (float32 softmax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: rows per split: a sequence of T rows uses ceil(T / SPLIT_ROWS) programs
SPLIT_ROWS = 512


@triton.jit
def _split_kernel(q, k, v, indptr, rows, o_part, m_part, l_part, sm_scale, n_splits, split,
                  G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, GP: tl.constexpr, DP: tl.constexpr,
                  DVP: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    start = tl.load(indptr + bh)
    end = tl.load(indptr + bh + 1)
    lo = start + s * split
    hi = tl.minimum(lo + split, end)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    qt = tl.load(q + (bh * G + g)[:, None].to(tl.int64) * D + d[None, :],
                 mask=(g[:, None] < G) & (d[None, :] < D), other=0.0).to(tl.float32)  # [GP, DP]
    m = tl.full((GP,), float("-inf"), tl.float32)
    l = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DVP), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        inside = n < hi
        r = tl.load(rows + n, mask=inside, other=0).to(tl.int64)
        kt = tl.load(k + r[:, None] * D + d[None, :], mask=inside[:, None] & (d[None, :] < D),
                     other=0.0).to(tl.float32)  # [BLOCK_N, DP]
        sc = tl.sum(qt[:, None, :] * kt[None, :, :], axis=2) * sm_scale  # [GP, BLOCK_N]
        sc = tl.where(inside[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        vt = tl.load(v + r[:, None] * DV + dv[None, :], mask=inside[:, None] & (dv[None, :] < DV),
                     other=0.0).to(tl.float32)  # [BLOCK_N, DVP]
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        m = m_new
    part = (bh * n_splits + s).to(tl.int64)
    tl.store(m_part + part * GP + g, m)
    tl.store(l_part + part * GP + g, l)
    tl.store(o_part + (part * GP + g)[:, None] * DVP + dv[None, :], acc)


@triton.jit
def _merge_kernel(o_part, m_part, l_part, out, n_splits, G: tl.constexpr, DV: tl.constexpr, GP: tl.constexpr,
                  DVP: tl.constexpr):
    bh = tl.program_id(0)
    g = tl.arange(0, GP)
    dv = tl.arange(0, DVP)
    m = tl.full((GP,), float("-inf"), tl.float32)
    for s in range(0, n_splits):
        part = (bh * n_splits + s).to(tl.int64)
        m = tl.maximum(m, tl.load(m_part + part * GP + g))
    safe = tl.where(m == float("-inf"), 0.0, m)  # a sequence without rows: zeros, not NaN
    l = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DVP), tl.float32)
    for s in range(0, n_splits):
        part = (bh * n_splits + s).to(tl.int64)
        w = tl.exp(tl.load(m_part + part * GP + g) - safe)  # an empty split: exp(-inf) = 0
        l += tl.load(l_part + part * GP + g) * w
        acc += tl.load(o_part + (part * GP + g)[:, None] * DVP + dv[None, :]) * w[:, None]
    res = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out + (bh * G + g)[:, None].to(tl.int64) * DV + dv[None, :], res.to(out.dtype.element_ty),
             mask=(g[:, None] < G) & (dv[None, :] < DV))


def sparse_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, indptr: torch.Tensor,
                  rows: torch.Tensor, scale: float, max_rows: int, out: torch.Tensor | None = None,
                  split: int = SPLIT_ROWS, block_n: int = 32) -> torch.Tensor:
    """``q [B, H*G, D]`` over each (request, KV head)'s rows of ``k_rows`` / ``v_rows`` (``[S, H, D]`` pool planes
    or ``[rows, D]``, contiguous), ``indptr [B*H + 1]`` and ``rows`` int32 on ``q``'s device; ``max_rows``: the
    longest list (known on the host: it sizes the grid). Returns ``[B, H*G, DV]`` in ``q``'s dtype."""
    B, Hq, D = q.shape
    BH = indptr.numel() - 1
    H = BH // B if B else 1
    G = Hq // H
    k2, v2 = k_rows.reshape(-1, D), v_rows.reshape(-1, v_rows.shape[-1])
    DV = v2.shape[-1]
    if out is None:
        out = torch.empty(B, Hq, DV, dtype=q.dtype, device=q.device)
    if BH == 0:
        return out
    n_splits = max(1, triton.cdiv(max(int(max_rows), 1), split))
    GP, DP, DVP = triton.next_power_of_2(G), triton.next_power_of_2(D), triton.next_power_of_2(DV)
    o_part = torch.empty(BH * n_splits * GP * DVP, dtype=torch.float32, device=q.device)
    m_part = torch.empty(BH * n_splits * GP, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    qc = q.contiguous()
    _split_kernel[(BH, n_splits)](qc, k2, v2, indptr, rows, o_part, m_part, l_part, float(scale), n_splits, split,
                                  G=G, D=D, DV=DV, GP=GP, DP=DP, DVP=DVP, BLOCK_N=block_n)
    _merge_kernel[(BH,)](o_part, m_part, l_part, out, n_splits, G=G, DV=DV, GP=GP, DVP=DVP)
    return out


def sparse_decode_reference(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, indptr: torch.Tensor,
                            rows: torch.Tensor, scale: float) -> torch.Tensor:
    B, Hq, D = q.shape
    BH = indptr.numel() - 1
    H = BH // B
    G = Hq // H
    k2, v2 = k_rows.reshape(-1, D), v_rows.reshape(-1, v_rows.shape[-1])
    qs = q.reshape(BH, G, D).to(torch.float32)
    ip = indptr.tolist()
    out = torch.zeros(BH, G, v2.shape[-1], dtype=torch.float32, device=q.device)
    for i in range(BH):
        r = rows[ip[i]: ip[i + 1]].long()
        if len(r):
            p = torch.softmax((qs[i] @ k2[r].to(torch.float32).T) * scale, dim=-1)
            out[i] = p @ v2[r].to(torch.float32)
    return out.reshape(B, Hq, -1).to(q.dtype)
