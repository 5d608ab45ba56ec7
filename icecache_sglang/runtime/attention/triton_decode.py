"""Sparse decode attention with IceCache's own Triton kernels (``kernels/sparse_decode.py``): the compact plan
(offsets and a row list per (request, KV head)) read on the device, nothing planned on the host per layer.

The same layout as :mod:`.flashinfer` (one decode sequence per (request, KV head), the layer's KV viewed as
rows ``slot * H + h``), without FlashInfer's host ``plan`` at every anchor layer of every step: the grid is
sized from the longest list, which the planner knows on the host (``DecodePlan.tokens``). Selected with
``decode_attention: triton``; measured against FlashInfer on a GPU by ``benchmarks/gpu/layer_overhead.py``.
"""

from __future__ import annotations

import torch

from .base import DecodePlan, SparseDecodeAttention


class TritonSparseDecode(SparseDecodeAttention):
    reads_slots = False  # the planner's compact form (indptr / rows) only

    def __init__(self):
        self._planned: tuple | None = None  # (plan, its offsets on the device, its longest list)

    def decode(self, q, k_cache, v_cache, plan: DecodePlan, scale: float) -> torch.Tensor:
        from icecache_sglang.kernels import sparse_decode  # Triton: imported where it runs

        if plan.indptr is None or plan.rows is None:
            raise ValueError("decode_attention triton reads a plan's compact form (indptr, rows)")
        B, Hq, _ = q.shape
        H = k_cache.shape[1]
        if plan.indptr.numel() != B * H + 1:
            raise ValueError(f"plan for {plan.indptr.numel() - 1} (request, KV head) pairs, batch has {B}x{H}")
        if self._planned is None or self._planned[0] is not plan:  # once per plan: the layers sharing it reuse it
            indptr = plan.indptr.to(q.device, non_blocking=True)
            longest = int(plan.tokens.max()) if plan.tokens is not None and plan.tokens.numel() else \
                int((plan.indptr[1:] - plan.indptr[:-1]).max())
            self._planned = (plan, indptr, longest)
        _, indptr, longest = self._planned
        return sparse_decode(q, k_cache, v_cache, indptr, plan.rows, scale, longest)
