"""Sparse decode attention over token-level index lists, planned on the device: no host plan per layer.

One decode "sequence" per (request, KV head), as FlashInfer's path lays it out (``decode_index.py``):
sequence ``bh = b * H + h`` attends the KV rows ``rows[indptr[bh] : indptr[bh + 1]]`` of the layer's
planes viewed as ``[rows, D]`` (row ``slot * H + h``), with the ``G`` query heads of its group. FlashInfer's
decode needs a host ``plan`` per index list (its split-KV schedule), at every anchor layer of every step;
these kernels take ``indptr`` on the device and a grid the caller sizes from the longest list it knows on the
host, so nothing is planned or read back per layer.

- :func:`sparse_decode`: split-KV in two launches. ``_split_kernel`` gives each (sequence, split of ``split``
  rows) an online softmax over its rows (running max, sum, weighted values in float32; the group's query heads
  padded to 16 rows for ``tl.dot``, as SGLang's grouped decode kernel does); ``_merge_kernel`` combines a
  sequence's splits into the output, in ``q``'s dtype. The split count is capped by the GPU's SMs over the
  sequences (``split_rows``), so one long list does not multiply every sequence's work; splits past a
  sequence's end return at once and are not merged.
- :func:`sparse_decode_reference`: the same in torch, one sequence at a time (float32 softmax).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: the fewest rows a split takes (a short list is one split); a long list is cut into at most
#: ``SPLITS_PER_SM x SMs / sequences`` splits, so a grid fills the GPU without growing with the longest list
MIN_SPLIT_ROWS = 256
SPLITS_PER_SM = 4
#: query heads per program: tl.dot's smallest M (a group of 4 leaves rows of zeros)
MIN_HEADS = 16
#: Triton's interpreter (set by this package without CUDA): its bfloat16 dot is wrong, so it dots in float32
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit(do_not_specialize=["n_splits", "split"])
def _split_kernel(q, k, v, indptr, rows, o_part, m_part, l_part, sm_scale, n_splits, split,
                  G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, GP: tl.constexpr, DP: tl.constexpr,
                  DVP: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    start = tl.load(indptr + bh)
    end = tl.load(indptr + bh + 1)
    lo = start + s * split
    if lo < end:  # a split past the list's end: nothing to do, and the merge does not read it
        hi = tl.minimum(lo + split, end)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        dv = tl.arange(0, DVP)
        qt = tl.load(q + (bh * G + g)[:, None].to(tl.int64) * D + d[None, :],
                     mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)  # [GP, DP]
        if FP32_DOT:
            qt = qt.to(tl.float32)
        m = tl.full((GP,), float("-inf"), tl.float32)
        l = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, DVP), tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            inside = n < hi
            r = tl.load(rows + n, mask=inside, other=0).to(tl.int64)
            kt = tl.load(k + r[:, None] * D + d[None, :], mask=inside[:, None] & (d[None, :] < D), other=0.0)
            vt = tl.load(v + r[:, None] * DV + dv[None, :], mask=inside[:, None] & (dv[None, :] < DV), other=0.0)
            if FP32_DOT:  # float32 models, and Triton's interpreter (whose bfloat16 dot is wrong)
                sc = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:  # bfloat16 / float16 on tensor cores, float32 accumulation
                sc = tl.dot(qt, tl.trans(kt))
            sc = tl.where(inside[None, :], sc * sm_scale, float("-inf"))  # [GP, BLOCK_N]
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            alpha = tl.exp(m - m_new)
            pr = tl.exp(sc - m_new[:, None])
            l = l * alpha + tl.sum(pr, axis=1)
            if FP32_DOT:
                acc = acc * alpha[:, None] + tl.dot(pr, vt.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pr.to(vt.dtype), vt)
            m = m_new
        part = (bh * n_splits + s).to(tl.int64)
        tl.store(m_part + part * GP + g, m)
        tl.store(l_part + part * GP + g, l)
        tl.store(o_part + (part * GP + g)[:, None] * DVP + dv[None, :], acc)


@triton.jit(do_not_specialize=["n_splits", "split"])
def _merge_kernel(indptr, o_part, m_part, l_part, out, n_splits, split, G: tl.constexpr, DV: tl.constexpr,
                  GP: tl.constexpr, DVP: tl.constexpr):
    bh = tl.program_id(0)
    used = tl.cdiv(tl.load(indptr + bh + 1) - tl.load(indptr + bh), split)  # the splits its rows filled
    g = tl.arange(0, GP)
    dv = tl.arange(0, DVP)
    m = tl.full((GP,), float("-inf"), tl.float32)
    for s in range(0, used):
        part = (bh * n_splits + s).to(tl.int64)
        m = tl.maximum(m, tl.load(m_part + part * GP + g))
    safe = tl.where(m == float("-inf"), 0.0, m)  # a sequence without rows: zeros, not NaN
    l = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DVP), tl.float32)
    for s in range(0, used):
        part = (bh * n_splits + s).to(tl.int64)
        w = tl.exp(tl.load(m_part + part * GP + g) - safe)
        l += tl.load(l_part + part * GP + g) * w
        acc += tl.load(o_part + (part * GP + g)[:, None] * DVP + dv[None, :]) * w[:, None]
    res = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out + (bh * G + g)[:, None].to(tl.int64) * DV + dv[None, :], res.to(out.dtype.element_ty),
             mask=(g[:, None] < G) & (dv[None, :] < DV))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def split_rows(longest: int, sequences: int, sms: int, block_n: int) -> tuple[int, int]:
    """``(n_splits, split)``: rows per split (a multiple of ``block_n``, at least ``MIN_SPLIT_ROWS``) and how
    many splits the longest list needs, at most about ``SPLITS_PER_SM`` programs per SM over the sequences."""
    cap = max(1, SPLITS_PER_SM * sms // max(sequences, 1))
    n = max(1, min(longest // MIN_SPLIT_ROWS, cap))
    split = triton.cdiv(triton.cdiv(max(longest, 1), n), block_n) * block_n
    return triton.cdiv(max(longest, 1), split), split


def sparse_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, indptr: torch.Tensor,
                  rows: torch.Tensor, scale: float, max_rows: int, out: torch.Tensor | None = None,
                  block_n: int = 32, num_warps: int = 4) -> torch.Tensor:
    """``q [B, H*G, D]`` over each (request, KV head)'s rows of ``k_rows`` / ``v_rows`` (``[S, H, D]`` pool planes
    or ``[rows, D]``, contiguous), ``indptr [B*H + 1]`` and ``rows`` int32 on ``q``'s device. ``max_rows``: the
    longest list, exactly or more (the host knows it; rows past a grid sized for fewer would be dropped).
    Returns ``[B, H*G, DV]`` in ``q``'s dtype."""
    B, Hq, D = q.shape
    BH = indptr.numel() - 1
    H = BH // B if B else 1
    G = Hq // H
    k2, v2 = k_rows.view(-1, D), v_rows.view(-1, v_rows.shape[-1])  # a copy of a non-contiguous pool: refused
    DV = v2.shape[-1]
    if out is None:
        out = torch.empty(B, Hq, DV, dtype=q.dtype, device=q.device)
    if BH == 0:
        return out
    n_splits, split = split_rows(int(max_rows), BH, _sm_count(q.device), block_n)
    GP = max(MIN_HEADS, triton.next_power_of_2(G))
    DP, DVP = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))
    o_part = torch.empty(BH * n_splits * GP * DVP, dtype=torch.float32, device=q.device)
    m_part = torch.empty(BH * n_splits * GP, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    fp32_dot = q.dtype == torch.float32 or INTERPRETED
    _split_kernel[(BH, n_splits)](q.contiguous(), k2, v2, indptr, rows, o_part, m_part, l_part, float(scale),
                                  n_splits, split, G=G, D=D, DV=DV, GP=GP, DP=DP, DVP=DVP, BLOCK_N=block_n,
                                  FP32_DOT=fp32_dot, num_warps=num_warps)
    _merge_kernel[(BH,)](indptr, o_part, m_part, l_part, out, n_splits, split, G=G, DV=DV, GP=GP, DVP=DVP)
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
