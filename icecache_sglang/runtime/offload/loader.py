"""Move the missed pages' KV rows from host memory into the device hot-page cache.

Host KV of a layer: a pinned ``[2, rows, D]`` tensor (keys, values; row ``slot * H + h``). Device: the
layer's ``[2, rows', D]`` tensor whose hot region the :class:`~.hot_pages.HotPageMap` hands out. Two ways:

- ``bulk`` (the design's): the host gathers the rows into one contiguous pinned preload buffer (parallel
  numba; row ``i`` holds its key then its value, so any count is one contiguous range and the device view
  has fixed strides), large host -> device copies move it (chunks of ``CHUNK_ROWS``: the gather of one
  overlaps the copy of the one before), and a Triton kernel scatters it into the hot rows.
- ``uva``: a Triton kernel reads the host rows directly over PCIe (pinned memory is mapped into the GPU's
  address space) and writes the hot rows; no staging, but many small PCIe reads.

Both split into :meth:`PageLoader.stage` (host work and asynchronous copies, before a graph replay) and
:meth:`PageLoader.scatter` (device work; the row count comes from a device scalar, so it can be captured in
a CUDA graph).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from icecache_sglang.kernels import copy_rows

MODES = ("bulk", "uva")


# explicit element loops: a slice assignment (out[i, 0, :] = src[0, r, :]) makes numba check for overlap and
# copy through a temporary, about 20x slower per row
@numba.njit(parallel=True, cache=True)
def _gather_parallel(src, rows, out):  # pragma: no cover - compiled
    n, D = rows.shape[0], src.shape[2]
    for i in numba.prange(n):
        r = rows[i]
        for d in range(D):
            out[i, 0, d] = src[0, r, d]
        for d in range(D):
            out[i, 1, d] = src[1, r, d]


@numba.njit(cache=True)
def _gather_serial(src, rows, out):  # pragma: no cover - compiled
    D = src.shape[2]
    for i in range(rows.shape[0]):
        r = rows[i]
        for d in range(D):
            out[i, 0, d] = src[0, r, d]
        for d in range(D):
            out[i, 1, d] = src[1, r, d]


CHUNK_ROWS = 16384  # bulk loading: rows gathered per chunk (8 MiB of bf16 K+V at d=128) before its copy starts
PARALLEL_GATHER_ROWS = 2048  # below this, waking the thread pool costs more than it saves


def _gather(src, rows, out) -> None:
    """``out[i] = (src[0, rows[i]], src[1, rows[i]])``: the bulk loader's host gather."""
    (_gather_parallel if len(rows) >= PARALLEL_GATHER_ROWS else _gather_serial)(src, rows, out)


def _is_front_of(rows: np.ndarray, buf: np.ndarray) -> bool:
    """Whether ``rows`` already is ``buf[:len(rows)]`` (written in place by ``HotPageMap.assign(out=...)``):
    same start, dtype and stride; an overlap at another offset still needs the copy."""
    return (rows.dtype == buf.dtype and rows.strides == buf.strides
            and rows.__array_interface__["data"][0] == buf.__array_interface__["data"][0])


def _np_view(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (16-bit floats as int16)."""
    if t.element_size() == 2:
        t = t.view(torch.int16)
    return t.numpy()


class PageLoader:
    """Loads up to ``max_rows`` rows per step into a device KV tensor."""

    def __init__(self, mode: str, max_rows: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 block_rows: int = 16, num_warps: int = 4):
        if mode not in MODES:
            raise ValueError(f"unknown page loading mode {mode!r}; choose from {MODES}")
        self.mode, self.max_rows, self.D, self.dtype = mode, max_rows, head_dim, dtype
        self.launch = dict(block_rows=block_rows, num_warps=num_warps)
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        # [n, dst rows..., src rows...] in one pinned int32 buffer -> one device buffer, one copy per step
        self._idx_host = torch.zeros(1 + 2 * max_rows, dtype=torch.int32, pin_memory=pin)
        self._idx_dev = torch.zeros(1 + 2 * max_rows, dtype=torch.int32, device=self.device)
        self._n_dev = self._idx_dev[:1]
        self._dst_dev = self._idx_dev[1: 1 + max_rows]
        self._src_dev = self._idx_dev[1 + max_rows:]
        if mode == "bulk":
            self._stage_host = torch.empty(2 * max_rows * head_dim, dtype=dtype, pin_memory=pin)
            self._stage_dev = torch.empty(2 * max_rows * head_dim, dtype=dtype, device=self.device)
        self._host_kv: torch.Tensor | None = None
        self.rows_last = 0

    def row_buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """(src, dst) views of the pinned index buffer: :meth:`HotPageMap.assign` can write the rows straight
        into them, so :meth:`stage` neither copies nor scans them."""
        idx = self._idx_host.numpy()
        return idx[1 + self.max_rows:], idx[1: 1 + self.max_rows]

    def stage(self, host_kv: torch.Tensor, src_rows: np.ndarray, dst_rows: np.ndarray, max_src_row: int | None = None
              ) -> None:
        """Host part: gather (bulk) and start the copies of this step's rows on the current stream. Rows out
        of ``host_kv`` are refused (the GPU would read outside the host tensor)."""
        n = len(src_rows)
        if n > self.max_rows:
            raise ValueError(f"{n} rows to load exceed the loader's {self.max_rows}")
        self.rows_last = n
        self._host_kv = host_kv
        src_buf, dst_buf = self.row_buffers()
        if n:
            top = int(src_rows.max()) if max_src_row is None else max_src_row
            if top >= host_kv.shape[1] or top >= 2**31:
                raise ValueError(f"host row {top} is outside the host KV ({host_kv.shape[1]} rows)")
            if not _is_front_of(src_rows, src_buf):
                src_buf[:n] = src_rows
            if not _is_front_of(dst_rows, dst_buf):
                dst_buf[:n] = dst_rows
        self._idx_host.numpy()[0] = n
        if self.mode == "bulk":
            hv, w = _np_view(host_kv), 2 * self.D
            for c0 in range(0, n, CHUNK_ROWS):  # gathering chunk k+1 overlaps the copy of chunk k
                c1 = min(n, c0 + CHUNK_ROWS)
                _gather(hv, src_buf[c0:c1], _np_view(self._stage_host[c0 * w: c1 * w].view(c1 - c0, 2, self.D)))
                self._stage_dev[c0 * w: c1 * w].copy_(self._stage_host[c0 * w: c1 * w], non_blocking=True)
            self._idx_dev[: 1 + n].copy_(self._idx_host[: 1 + n], non_blocking=True)
        elif n:  # count and dst rows, then src rows: two ranges of the one buffer
            self._idx_dev[: 1 + n].copy_(self._idx_host[: 1 + n], non_blocking=True)
            self._src_dev[:n].copy_(self._idx_host[1 + self.max_rows: 1 + self.max_rows + n], non_blocking=True)
        else:
            self._idx_dev[:1].copy_(self._idx_host[:1], non_blocking=True)

    def scatter(self, dev_kv: torch.Tensor) -> None:
        """Device part (graph-capturable): write the staged rows into ``dev_kv [2, rows', D]``."""
        dst = self._dst_dev
        if self.mode == "bulk":
            staged = self._stage_dev.view(self.max_rows, 2, self.D).permute(1, 0, 2)  # [2, max_rows, D]
            copy_rows(staged, dev_kv, None, dst, n=self._n_dev, max_rows=self.max_rows, **self.launch)
        else:
            if self._host_kv is None:
                return
            copy_rows(self._host_kv, dev_kv, self._src_dev, dst, n=self._n_dev,
                      max_rows=self.max_rows, **self.launch)

    def load(self, host_kv: torch.Tensor, dev_kv: torch.Tensor, src_rows: np.ndarray, dst_rows: np.ndarray,
             max_src_row: int | None = None) -> int:
        """Both parts, eagerly; returns the rows moved."""
        self.stage(host_kv, src_rows, dst_rows, max_src_row)
        if len(src_rows):
            self.scatter(dev_kv)
        return len(src_rows)
