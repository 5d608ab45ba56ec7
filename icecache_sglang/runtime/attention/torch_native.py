"""Sparse decode attention in plain torch: gather each (request, KV head)'s slots, masked softmax."""

from __future__ import annotations

import torch

from .base import DecodePlan, SparseDecodeAttention


class TorchSparseDecode(SparseDecodeAttention):
    """Exact attention over the plan's tokens (float32 softmax); the CPU path and the reference the GPU
    path is checked against."""

    def decode(self, q, k_cache, v_cache, plan: DecodePlan, scale: float) -> torch.Tensor:
        B, Hq, d = q.shape
        H = k_cache.shape[1]
        G = Hq // H
        heads = torch.arange(H, device=k_cache.device)[None, :, None]
        k = k_cache[plan.slots, heads]  # [B, H, T, d]
        v = v_cache[plan.slots, heads]  # [B, H, T, dv]
        qg = q.view(B, H, G, d).to(torch.float32)
        scores = torch.matmul(qg, k.to(torch.float32).transpose(-1, -2)) * scale  # [B, H, G, T]
        scores.masked_fill_(~plan.valid[:, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v.to(torch.float32))  # [B, H, G, dv]
        return out.reshape(B, Hq, -1).to(q.dtype)


def rows_decode_reference(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, indptr: torch.Tensor,
                          indices: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode over FlashInfer-style token-level index lists, one sequence per (request, KV head):
    ``q [B, H*G, D]``, ``k_rows``/``v_rows`` ``[rows, D]`` (or anything whose last dim is D), ``indptr [B*H+1]``
    and ``indices``. Float32 softmax; the torch stand-in for the FlashInfer call and its reference."""
    B, Hq, d = q.shape
    BH = indptr.numel() - 1
    H = BH // B
    G = Hq // H
    k2, v2 = k_rows.reshape(-1, k_rows.shape[-1]), v_rows.reshape(-1, v_rows.shape[-1])
    qs = q.reshape(BH, G, d).to(torch.float32)
    ip = indptr.tolist()
    out = torch.empty(BH, G, v2.shape[-1], dtype=torch.float32, device=q.device)
    for i in range(BH):
        rows = indices[ip[i]: ip[i + 1]].long()
        k = k2[rows].to(torch.float32)
        v = v2[rows].to(torch.float32)
        p = torch.softmax((qs[i] @ k.T) * scale, dim=-1)
        out[i] = p @ v
    return out.reshape(B, Hq, -1).to(q.dtype)
