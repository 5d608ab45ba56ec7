"""FlashInfer's token-level KV index for one decode "sequence" per (request, KV head).

The KV of a layer is viewed as rows of one head each (``[T, rows, head_dim]``, FlashInfer page size 1):
row ``slot * H + h`` is KV head ``h`` of SGLang pool slot ``slot``, and rows from ``hot_base`` on hold the
hot-page cache, block ``b`` at rows ``hot_base + b * C ... + C - 1``. Sequence ``b * H + h`` attends the
rows ``indices[indptr[bh] : indptr[bh + 1]]``.

- :func:`plan_rows`: from a ``DecodePlan`` (``slots``/``valid`` ``[B, H, T]``), the valid slots in order.
- :func:`sparse_rows`: from the step's fixed slots per request (sink + unindexed tail, shared by the heads)
  and each (request, head)'s hot-cache blocks with their fill: fixed rows first, then the pages' rows.

``indptr`` is an input: the host knows every count (its selections and fills) and FlashInfer's ``plan`` needs
it on the host anyway; ``*_indptr`` helpers compute it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _plan_rows_kernel(slots, valid, indptr, out, H, T, BLOCK_T: tl.constexpr):
    bh = tl.program_id(0)
    h = bh % H
    at = tl.load(indptr + bh).to(tl.int64)
    base = bh.to(tl.int64) * T
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        inside = t < T
        ok = tl.load(valid + base + t, mask=inside, other=0) != 0
        s = tl.load(slots + base + t, mask=inside, other=0).to(tl.int64)
        take = ok.to(tl.int32)
        pos = tl.cumsum(take, 0) - take
        tl.store(out + at + pos, (s * H + h).to(tl.int32), mask=ok)
        at += tl.sum(take, 0)


def plan_indptr(valid: torch.Tensor) -> torch.Tensor:
    """``[B*H + 1]`` int32 offsets of a plan's valid tokens per (request, KV head), on ``valid``'s device."""
    counts = valid.reshape(-1, valid.shape[-1]).sum(-1, dtype=torch.int32)
    return torch.nn.functional.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))


def plan_rows(slots: torch.Tensor, valid: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Rows ``slot * H + h`` of each (request, KV head)'s valid plan entries, at ``indptr`` (int32)."""
    B, H, T = slots.shape
    if out is None:
        out = torch.empty(int(indptr[-1]), dtype=torch.int32, device=slots.device)
    if B * H == 0 or T == 0:
        return out
    _plan_rows_kernel[(B * H,)](slots.contiguous(), valid.contiguous().view(torch.uint8), indptr, out, H, T,
                                BLOCK_T=min(1024, triton.next_power_of_2(T)))
    return out


def plan_rows_reference(slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    B, H, T = slots.shape
    rows = slots.long() * H + torch.arange(H, device=slots.device).view(1, H, 1)
    return rows[valid].to(torch.int32)


@triton.jit
def _sparse_rows_kernel(fixed_slots, fixed_len, blocks, fills, indptr, out, H, F, P, hot_base,
                        C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_P: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    at = tl.load(indptr + bh).to(tl.int64)
    nf = tl.load(fixed_len + b)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        m = f < nf
        s = tl.load(fixed_slots + b.to(tl.int64) * F + f, mask=m, other=0).to(tl.int64)
        tl.store(out + at + f, (s * H + h).to(tl.int32), mask=m)
    at += nf
    p = tl.arange(0, BLOCK_P)
    pm = p < P
    blk = tl.load(blocks + bh.to(tl.int64) * P + p, mask=pm, other=-1).to(tl.int64)
    fill = tl.load(fills + bh.to(tl.int64) * P + p, mask=pm, other=0)
    fill = tl.where(blk >= 0, fill, 0)
    off = tl.cumsum(fill, 0) - fill
    for j in range(C):
        tl.store(out + at + off, (hot_base + blk * C + j).to(tl.int32), mask=j < fill)
        off += 1


def sparse_indptr(fixed_len: torch.Tensor, blocks: torch.Tensor, fills: torch.Tensor) -> torch.Tensor:
    """``[B*H + 1]`` int32 offsets for :func:`sparse_rows` (``blocks``/``fills`` ``[B, H, P]``)."""
    B, H, _ = blocks.shape
    per = torch.where(blocks >= 0, fills, 0).sum(-1) + fixed_len.view(B, 1)
    return torch.nn.functional.pad(torch.cumsum(per.reshape(-1), 0, dtype=torch.int32), (1, 0))


def sparse_rows(fixed_slots: torch.Tensor, fixed_len: torch.Tensor, blocks: torch.Tensor, fills: torch.Tensor,
                indptr: torch.Tensor, hot_base: int, page_size: int, out: torch.Tensor | None = None,
                batch: int | None = None) -> torch.Tensor:
    """Rows of each (request, KV head): its request's ``fixed_slots[b, :fixed_len[b]]`` (as ``slot*H + h``),
    then the rows of its ``blocks[b, h, p]`` (``fills[b, h, p]`` rows from ``hot_base + block*C``; blocks
    below zero are skipped). ``batch`` limits the launch to the first requests (graph buffers are sized for
    the largest batch)."""
    Bmax, H, P = blocks.shape
    B = Bmax if batch is None else batch
    F = fixed_slots.shape[1]
    if out is None:
        out = torch.empty(int(indptr[B * H]), dtype=torch.int32, device=blocks.device)
    if B * H == 0:
        return out
    _sparse_rows_kernel[(B * H,)](fixed_slots, fixed_len, blocks, fills, indptr, out, H, F, P, hot_base,
                                  C=page_size, BLOCK_F=min(1024, triton.next_power_of_2(max(F, 1))),
                                  BLOCK_P=triton.next_power_of_2(max(P, 1)))
    return out


def sparse_rows_reference(fixed_slots, fixed_len, blocks, fills, hot_base: int, page_size: int) -> torch.Tensor:
    B, H, P = blocks.shape
    parts = []
    for b in range(B):
        fixed = fixed_slots[b, : int(fixed_len[b])].long().cpu()
        for h in range(H):
            parts.append(fixed * H + h)
            for p in range(P):
                blk = int(blocks[b, h, p])
                if blk >= 0:
                    parts.append(hot_base + blk * page_size + torch.arange(int(fills[b, h, p])))
    return torch.cat(parts).to(torch.int32) if parts else torch.empty(0, dtype=torch.int32)
