"""One attention layer's decode step over host-resident KV, the GPU path of IceCache.

Per step, given the requests' fixed slots (sink + unindexed tail, in the device pool) and each (request,
KV head)'s selected pages (ids + key-store slots, from the indexer):

host (``prepare``):
  1. :class:`~.hot_pages.HotPageMap` matches the selection against the device hot-page cache;
  2. :class:`~.loader.PageLoader` gathers the missed pages' rows and starts one host -> device copy;
  3. the small per-step inputs (fixed slots, blocks, fills) go to the device in one copy, and FlashInfer's
     ``plan`` gets the per-(request, head) token counts.
device (``device_step``, captured in a CUDA graph per batch size when graphs are on):
  4. scatter the loaded rows into the hot cache;
  5. build the token-level index list (:func:`~icecache_sglang.kernels.sparse_rows`);
  6. one FlashInfer decode over sink + selected pages + tail, one sequence per (request, KV head).

The layer's device KV is one ``[2, S*H + hot_rows, D]`` tensor: rows ``slot*H + h`` are the pool (SGLang's
layout, flattened), the rest is the hot-page cache, so one index list and one attention pass cover both.
Without CUDA (or without FlashInfer) step 6 runs :func:`rows_decode_reference` and graphs are off: the CPU
tests exercise every other part as it runs on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from icecache_sglang.kernels import sparse_rows

from ..attention.torch_native import rows_decode_reference
from .hot_pages import HotPageMap
from .loader import PageLoader


@dataclass
class StepInputs:
    """What the host knows at a decode step, for B requests of H KV heads."""

    req_rows: np.ndarray  # [B] request rows (they key the hot cache's lanes)
    fixed_slots: np.ndarray  # [B, F] pool slots of the sink and the unindexed tail (-1 padded)
    fixed_len: np.ndarray  # [B]
    pages: np.ndarray  # [B, H, P] selected page ids (-1 padded)
    slots: np.ndarray  # [B, H, P, C] key-store slots of the selected pages' tokens (-1 padded)


@dataclass
class StepStats:
    rows_loaded: int
    pages_hit: int
    pages_missed: int


def _flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


class OffloadedDecodeLayer:
    def __init__(self, *, max_batch: int, n_kv_heads: int, group: int, head_dim: int, page_size: int,
                 max_pages: int, max_fixed: int, pool_slots: int, cache_blocks: int, n_req_rows: int,
                 dtype: torch.dtype, device: torch.device | str, loader_mode: str = "uva",
                 scale: float | None = None, use_flashinfer: bool | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.Bmax, self.H, self.G, self.D, self.C = max_batch, n_kv_heads, group, head_dim, page_size
        self.P, self.F, self.dtype = max_pages, max_fixed, dtype
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.hot_base = pool_slots * n_kv_heads
        self.map = HotPageMap(n_req_rows * n_kv_heads, cache_blocks, page_size, n_kv_heads, self.hot_base)
        self.kv = torch.zeros(2, self.hot_base + self.map.rows, head_dim, dtype=dtype, device=self.device)
        self.loader = PageLoader(loader_mode, max_batch * n_kv_heads * max_pages * page_size, head_dim, dtype,
                                 self.device)
        self.max_tokens = max_fixed + max_pages * page_size
        B, H, P, F = max_batch, n_kv_heads, max_pages, max_fixed
        self._sizes = [B * F, B, B * H * P, B * H * P]
        total = sum(self._sizes)
        self._small_host = torch.zeros(total, dtype=torch.int32, pin_memory=self.cuda)
        self._small_dev = torch.zeros(total, dtype=torch.int32, device=self.device)
        v = torch.split(self._small_dev, self._sizes)
        self.fixed_slots, self.fixed_len = v[0].view(B, F), v[1]
        self.blocks, self.fills = v[2].view(B, H, P), v[3].view(B, H, P)
        self.q = torch.zeros(B, H * group, head_dim, dtype=dtype, device=self.device)
        self.out = torch.zeros_like(self.q)
        self.use_flashinfer = (self.cuda and _flashinfer_available()) if use_flashinfer is None else use_flashinfer
        self._buffers: dict = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._workspace = None
        self._copied = torch.cuda.Event() if self.cuda else None
        self._indptr_np: dict[int, np.ndarray] = {}

    @property
    def pool(self) -> torch.Tensor:
        """The pool region as SGLang's ``[2, S, H, D]`` (keys, values)."""
        return self.kv[:, : self.hot_base].view(2, -1, self.H, self.D)

    # ---- host part ----
    def _bufs(self, B: int):
        if B not in self._buffers:
            if self.use_flashinfer:
                from ..attention.flashinfer import WORKSPACE_BYTES, GraphDecodeBuffers
                if self._workspace is None:
                    self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
                self._buffers[B] = GraphDecodeBuffers(B, self.H, self.max_tokens, self.device, self._workspace)
            else:
                self._buffers[B] = _TorchRowsBuffers(B, self.H, self.max_tokens, self.device, self.scale)
        return self._buffers[B]

    def prepare(self, inp: StepInputs, host_kv: torch.Tensor) -> StepStats:
        B, H, P, C, F = len(inp.req_rows), self.H, self.P, self.C, self.F
        if B > self.Bmax:
            raise ValueError(f"batch {B} exceeds the layer's {self.Bmax}")
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copies have read the pinned buffers
        lanes, heads = self.map.lanes(inp.req_rows)
        pages, slots = inp.pages, inp.slots
        if pages.shape[2] != P:  # fewer pages than the layer's maximum: pad (the map sees fixed widths)
            pages = np.full((B, H, P), -1, inp.pages.dtype)
            slots = np.full((B, H, P, C), -1, inp.slots.dtype)
            pages[:, :, : inp.pages.shape[2]] = inp.pages
            slots[:, :, : inp.slots.shape[2]] = inp.slots
        a = self.map.assign(lanes, heads, pages.reshape(B * H, P), slots.reshape(B * H, P, C),
                            out=self.loader.row_buffers())
        self.loader.stage(host_kv, a.src_rows, a.dst_rows, a.max_src_row)
        host = torch.split(self._small_host, self._sizes)
        fs = host[0].numpy().reshape(self.Bmax, F)
        fs[:B] = -1
        fs[:B, : inp.fixed_slots.shape[1]] = inp.fixed_slots
        host[1].numpy()[:B] = inp.fixed_len
        host[2].numpy().reshape(self.Bmax, H, P)[:B] = a.blocks.reshape(B, H, P)
        host[3].numpy().reshape(self.Bmax, H, P)[:B] = a.fills.reshape(B, H, P)
        self._small_dev.copy_(self._small_host, non_blocking=True)
        counts = np.where(a.blocks >= 0, a.fills, 0).reshape(B, H, P).sum(-1) + np.asarray(inp.fixed_len)[:, None]
        indptr = np.zeros(B * H + 1, np.int32)
        np.cumsum(counts.reshape(-1), out=indptr[1:])
        self._bufs(B).plan(indptr, self.G, self.D, self.dtype, self.dtype, self.scale)
        if self._copied is not None:
            self._copied.record()
        return StepStats(len(a.src_rows), a.hits, a.misses)

    # ---- device part ----
    def device_step(self, B: int) -> torch.Tensor:
        bufs = self._bufs(B)
        self.loader.scatter(self.kv)
        sparse_rows(self.fixed_slots, self.fixed_len, self.blocks, self.fills, bufs.indptr, self.hot_base, self.C,
                    out=bufs.indices, batch=B)
        return bufs.run(self.q[:B], self.kv[0], self.kv[1], self.out[:B])

    def step(self, q: torch.Tensor, inp: StepInputs, host_kv: torch.Tensor, graph: bool = False) -> torch.Tensor:
        """The whole step: ``q [B, H*G, D]``; returns the attention output ``[B, H*G, D]`` (a view of a
        fixed buffer, valid until the next step)."""
        B = q.shape[0]
        stats = self.prepare(inp, host_kv)
        self.q[:B].copy_(q)
        if graph and self.cuda:
            g = self._graphs.get(B)
            if g is None:
                g = self._capture(B)
            g.replay()
        else:
            self.device_step(B)
        self.last_stats = stats
        return self.out[:B]

    def _capture(self, B: int) -> torch.cuda.CUDAGraph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self.device_step(B)  # warm-up (Triton compiles, FlashInfer loads) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.device_step(B)
        self._graphs[B] = g
        return g


class _TorchRowsBuffers:
    """The CPU stand-in of :class:`GraphDecodeBuffers`: same buffers, torch attention."""

    def __init__(self, batch: int, H: int, max_tokens: int, device, scale: float):
        self.H, self.scale = H, scale
        self.indptr = torch.zeros(batch * H + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(batch * H * max_tokens, dtype=torch.int32, device=device)

    def plan(self, indptr, group, head_dim, q_dtype, kv_dtype, scale) -> None:
        self.indptr.copy_(torch.from_numpy(indptr))
        self.scale = scale

    def run(self, q, k_rows, v_rows, out):
        n = int(self.indptr[-1])
        out.copy_(rows_decode_reference(q, k_rows, v_rows, self.indptr, self.indices[:n], self.scale))
        return out
