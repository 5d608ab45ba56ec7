"""Sparse decode attention with FlashInfer (``flashinfer-python==0.7.2``), one sequence per (request, KV head).

FlashInfer's decode takes one page table per sequence shared by all KV heads; IceCache selects different
pages per KV head. So each (request, KV head) becomes its own decode sequence with ``num_kv_heads=1`` and
``num_qo_heads = group size`` (its GQA group's query heads), over the layer's KV viewed as rows of one head
(``[rows, 1, 1, D]``: FlashInfer page size 1, so index lists are token-level and partly filled IceCache pages
need no padding). Sink, selected pages and recent tokens are one index list, so one pass covers them.

:class:`FlashInferSparseDecode` is the eager :class:`SparseDecodeAttention` over a :class:`DecodePlan`;
:class:`GraphDecodeBuffers` holds the fixed buffers of one captured batch size.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import DecodePlan, SparseDecodeAttention

WORKSPACE_BYTES = 128 * 1024 * 1024
#: FlashInfer plans in flight at once (one wrapper each, sharing the float workspace: runs are in stream
#: order): planning waits for the copy of the plan made this many plans earlier, not the last one
PLAN_RING = 4


def _flashinfer():
    try:
        import flashinfer
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("IceCache's GPU decode path needs flashinfer-python==0.7.2 (SGLang's own pin)") from e
    return flashinfer


def rows_view(kv_plane: torch.Tensor) -> torch.Tensor:
    """A ``[S, H, D]`` pool tensor, or ``[rows, D]``, as FlashInfer NHD pages of one token and one head."""
    return kv_plane.reshape(-1, 1, 1, kv_plane.shape[-1])


class FlashInferSparseDecode(SparseDecodeAttention):
    """Eager sparse decode: plans once per :class:`DecodePlan` (the layers sharing it reuse the plan), from the
    host layout the planner gives (else derived on the device and its counts read back)."""

    reads_slots = False  # a planner's plans carry indptr / rows (the fallback derives them from slots)

    def __init__(self, device: torch.device | str = "cuda", use_tensor_cores: bool = False,
                 ring: int = PLAN_RING):
        fi = _flashinfer()
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # FlashInfer's plan fills its wrapper's pinned host buffer and copies it to the device without
        # waiting; planning the same wrapper again before that copy ran would change the schedule under it.
        # A ring of wrappers lets the host plan ``ring - 1`` anchor layers ahead of the device.
        self.wrappers = [fi.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=use_tensor_cores)
                         for _ in range(max(1, ring))]
        self._copied: list[torch.cuda.Event | None] = [None] * len(self.wrappers)  # after each one's plan copy
        self._next = 0
        self.wrapper = self.wrappers[0]  # the one planned last
        self._ones: torch.Tensor | None = None
        self._planned: tuple | None = None  # (the plan last planned, its shapes and dtypes)

    def decode(self, q, k_cache, v_cache, plan: DecodePlan, scale: float) -> torch.Tensor:
        B, Hq, d = q.shape
        H = k_cache.shape[1]
        key = (H, Hq, d, q.dtype, k_cache.dtype, scale)
        if self._planned is not None and self._planned[0] is plan and self._planned[1:] == key:
            return self.run(q, k_cache, v_cache)  # a layer sharing the previous layer's plan: planned once
        if plan.indptr is not None and plan.rows is not None:  # laid out by the planner: no device read-back
            if plan.indptr.numel() != B * H + 1:
                raise ValueError(f"plan for {plan.indptr.numel() - 1} (request, KV head) pairs, batch has {B}x{H}")
            indptr_host, indices = plan.indptr, plan.rows
        else:
            from icecache_sglang.kernels import plan_indptr, plan_rows  # Triton: imported where it runs

            indptr = plan_indptr(plan.valid)
            indices = plan_rows(plan.slots, plan.valid, indptr)
            indptr_host = indptr.cpu()
        i = self._next
        self._next = (i + 1) % len(self.wrappers)
        if self._copied[i] is not None:  # this wrapper's previous plan has reached the device
            self._copied[i].synchronize()
        self.wrapper = self.wrappers[i]
        self.plan(indptr_host, indices, H, Hq // H, d, q.dtype, k_cache.dtype, scale)
        self._copied[i] = torch.cuda.Event()
        self._copied[i].record()
        self._planned = (plan,) + key
        return self.run(q, k_cache, v_cache)

    def plan(self, indptr_host: torch.Tensor, indices: torch.Tensor, n_kv_heads: int, group: int, head_dim: int,
             q_dtype: torch.dtype, kv_dtype: torch.dtype, scale: float, last_page_len: torch.Tensor | None = None
             ) -> None:
        BH = indptr_host.numel() - 1
        self._H = n_kv_heads
        if last_page_len is None:  # page size 1: every page is full (kept, not made per layer)
            # on the host, pinned: FlashInfer's plan reads it there (``last_page_len.to("cpu")``, a wait for the
            # device had it been a device tensor) and copies it to the device without waiting
            if self._ones is None or self._ones.numel() < BH:
                self._ones = torch.ones(max(BH, 64), dtype=torch.int32).pin_memory()
            last_page_len = self._ones[:BH]
        self.wrapper.plan(indptr_host, indices, last_page_len, num_qo_heads=group, num_kv_heads=1,
                          head_dim=head_dim, page_size=1, q_data_type=q_dtype, kv_data_type=kv_dtype,
                          sm_scale=scale)

    def run(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, out: torch.Tensor | None = None
            ) -> torch.Tensor:
        """``q [B, H*G, D]`` (query head ``h*G + g`` reads KV head ``h``) over the planned rows of ``k_rows`` /
        ``v_rows`` (``[S, H, D]`` pool tensors or ``[rows, D]``); returns ``[B, H*G, D]``."""
        B, Hq, d = q.shape
        H = self._H
        qs = q.reshape(B * H, Hq // H, d)
        o = self.wrapper.run(qs, (rows_view(k_rows), rows_view(v_rows)),
                             out=None if out is None else out.view(B * H, Hq // H, -1))
        return o.view(B, Hq, -1)


class GraphDecodeBuffers:
    """A CUDA-graph-safe wrapper for ``batch`` requests of ``n_kv_heads`` heads: FlashInfer's index buffers
    are fixed (``max_tokens`` per sequence), ``plan`` runs on the host before each replay and the index list
    is written in place by the graph."""

    def __init__(self, batch: int, n_kv_heads: int, max_tokens: int, device: torch.device | str = "cuda",
                 workspace: torch.Tensor | None = None, use_tensor_cores: bool = False):
        fi = _flashinfer()
        self.batch, self.H = batch, n_kv_heads
        BH = batch * n_kv_heads
        self.workspace = workspace if workspace is not None else torch.empty(WORKSPACE_BYTES, dtype=torch.uint8,
                                                                             device=device)
        self.indptr = torch.zeros(BH + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(BH * max_tokens, dtype=torch.int32, device=device)
        self.last_page_len = torch.ones(BH, dtype=torch.int32, device=device)
        self.wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=use_tensor_cores,
            paged_kv_indptr_buffer=self.indptr, paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_page_len)
        self._indptr_host = torch.zeros(BH + 1, dtype=torch.int32, pin_memory=True)
        self._ones_host = torch.ones(BH, dtype=torch.int32, pin_memory=True)  # plan reads last_page_len on the host

    def plan(self, indptr: np.ndarray, group: int, head_dim: int, q_dtype: torch.dtype, kv_dtype: torch.dtype,
             scale: float) -> None:
        """Host side, before replay: the per-(request, head) token counts as offsets ``indptr [BH+1]``."""
        self._indptr_host.numpy()[:] = indptr
        n = int(indptr[-1])
        self.wrapper.plan(self._indptr_host, self.indices[:n], self._ones_host, num_qo_heads=group,
                          num_kv_heads=1, head_dim=head_dim, page_size=1, q_data_type=q_dtype,
                          kv_data_type=kv_dtype, sm_scale=scale)

    def run(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, Hq, d = q.shape
        G = Hq // self.H
        self.wrapper.run(q.view(B * self.H, G, d), (rows_view(k_rows), rows_view(v_rows)),
                         out=out.view(B * self.H, G, -1))
        return out
