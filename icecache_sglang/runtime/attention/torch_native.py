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
