"""Copy KV rows by index: ``dst[t, dst_rows[i]] = src[t, src_rows[i]]`` for every plane ``t``.

KV lives in plane-stacked tensors ``[T, rows, width]`` (T = 2: keys and values), so one launch moves both.
Index lists are optional (``None`` = the identity), entries below zero are skipped, and the number of rows
can come from a device scalar so a CUDA graph can replay the copy with a different count each step.

Uses:
- scatter: the preload buffer (identity source) into hot-page-cache rows (``dst_rows``);
- UVA gather: ``src`` in pinned host memory, read by the GPU directly over PCIe (``src_rows`` and
  ``dst_rows``), with no staging copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_rows_kernel(src, dst, src_rows, dst_rows, n_ptr, n_max, width,
                      src_plane, src_row, dst_plane, dst_row,
                      HAS_SRC_ROWS: tl.constexpr, HAS_DST_ROWS: tl.constexpr, HAS_N: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    if HAS_N:
        n = tl.load(n_ptr)
    else:
        n = n_max
    rmask = r < n
    if HAS_SRC_ROWS:
        s = tl.load(src_rows + r, mask=rmask, other=-1).to(tl.int64)
    else:
        s = r.to(tl.int64)
    if HAS_DST_ROWS:
        d = tl.load(dst_rows + r, mask=rmask, other=-1).to(tl.int64)
    else:
        d = r.to(tl.int64)
    rmask = rmask & (s >= 0) & (d >= 0)
    src_base = src + plane * src_plane + s * src_row
    dst_base = dst + plane * dst_plane + d * dst_row
    for w0 in range(0, width, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        m = rmask[:, None] & (w[None, :] < width)
        x = tl.load(src_base[:, None] + w[None, :], mask=m)
        tl.store(dst_base[:, None] + w[None, :], x, mask=m)


def _planes(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"expected [T, rows, width] (or [rows, width]) with unit last stride, got {tuple(x.shape)}")
    return x


def copy_rows(src: torch.Tensor, dst: torch.Tensor, src_rows: torch.Tensor | None = None,
              dst_rows: torch.Tensor | None = None, n: int | torch.Tensor | None = None,
              max_rows: int | None = None, block_rows: int = 16, num_warps: int = 4) -> torch.Tensor:
    """``dst[t, dst_rows[i]] = src[t, src_rows[i]]`` for ``i < n`` and every plane ``t``; returns ``dst``.

    ``src``/``dst``: ``[T, rows, width]`` or ``[rows, width]``, same dtype and plane count. ``src`` may be a
    pinned host tensor (the GPU reads it over PCIe). ``n``: an int, or a one-element int32 device tensor (read
    by the kernel, so a captured graph copies a different count each replay; then ``max_rows`` sizes the
    grid). Without ``n``, the length of the given index list. ``block_rows``/``num_warps``: rows per program and
    its warps (more rows in flight help reads over PCIe)."""
    s3, d3 = _planes(src), _planes(dst)
    if s3.shape[0] != d3.shape[0] or s3.shape[2] != d3.shape[2] or s3.dtype != d3.dtype:
        raise ValueError(f"src {tuple(s3.shape)} {s3.dtype} and dst {tuple(d3.shape)} {d3.dtype} do not match")
    n_tensor = n if isinstance(n, torch.Tensor) else None
    if n_tensor is not None:
        if max_rows is None:
            raise ValueError("a device row count needs max_rows to size the grid")
        rows = int(max_rows)
    elif n is not None:
        rows = int(n)
    elif src_rows is not None:
        rows = src_rows.numel()
    elif dst_rows is not None:
        rows = dst_rows.numel()
    else:
        rows = s3.shape[1]
    if rows == 0:
        return dst
    BLOCK_R, BLOCK_W = block_rows, min(128, triton.next_power_of_2(s3.shape[2]))
    dummy = d3  # never read when its HAS_* flag is off
    grid = (triton.cdiv(rows, BLOCK_R), s3.shape[0])
    _copy_rows_kernel[grid](
        s3, d3, src_rows if src_rows is not None else dummy, dst_rows if dst_rows is not None else dummy,
        n_tensor if n_tensor is not None else dummy, rows, s3.shape[2],
        s3.stride(0), s3.stride(1), d3.stride(0), d3.stride(1),
        HAS_SRC_ROWS=src_rows is not None, HAS_DST_ROWS=dst_rows is not None, HAS_N=n_tensor is not None,
        BLOCK_R=BLOCK_R, BLOCK_W=BLOCK_W, num_warps=num_warps)
    return dst


def copy_rows_reference(src: torch.Tensor, dst: torch.Tensor, src_rows: torch.Tensor | None = None,
                        dst_rows: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
    """What :func:`copy_rows` computes, in plain torch (on ``dst``'s device)."""
    s3, d3 = _planes(src), _planes(dst)
    if n is None:
        n = (src_rows.numel() if src_rows is not None else dst_rows.numel() if dst_rows is not None
             else s3.shape[1])
    idx = torch.arange(n)
    s = src_rows[:n].long().cpu() if src_rows is not None else idx
    d = dst_rows[:n].long().cpu() if dst_rows is not None else idx
    keep = (s >= 0) & (d >= 0)
    s, d = s[keep], d[keep]
    d3[:, d.to(d3.device)] = s3[:, s.to(s3.device)].to(d3.device)
    return dst
