"""Which selected pages are already on the GPU: the host-side map of the device hot-page cache.

The device hot-page cache gives every *lane* (request row, anchor layer, KV head) ``cap >= P`` blocks of
``C`` rows. At each step a lane's P selected pages (page id + the key-store slots of its tokens) are matched
against what its blocks hold: a page whose id and slots are unchanged is a hit and is not copied again; a
miss (new page, or a page whose tokens changed since it was loaded: "dirty") takes the least recently used
block that this step does not need (a stale copy of a dirty page first). Only the misses' rows travel
host -> device.

This bookkeeping runs on the host because the selections arrive there (from the indexer) and the gather of
the missed rows from host memory must know them before anything is copied; matching on the GPU would need a
device -> host round trip per layer. A layer-reuse group shares its anchor's map: same pages, same blocks,
each layer moving its own K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


@numba.njit(cache=True)
def _assign_lane(i, lane, h, pages, slots, n_kv_heads, hot_base, res_page, res_slots, res_stamp, stamp,
                 blocks, fills, src_rows, dst_rows, out_at):  # pragma: no cover - compiled
    """One lane: match its selected pages, give the misses LRU blocks, write the misses' rows from
    ``out_at``. Returns (rows, hits, misses)."""
    P = pages.shape[1]
    C = slots.shape[2]
    cap = res_page.shape[1]
    # the lane's resident page ids in a small open-addressing table (block index per entry)
    T = 1
    while T < 2 * cap:
        T *= 2
    table = np.full(T, -1, np.int64)
    for j in range(cap):
        pg = res_page[lane, j]
        if pg >= 0:
            k = (pg * 0x9E3779B1) & (T - 1)
            while table[k] >= 0:
                k = (k + 1) & (T - 1)
            table[k] = j
    used = np.zeros(cap, np.bool_)
    miss = np.empty(P, np.int64)
    nm = 0
    hits = 0
    for p in range(P):
        blocks[i, p] = -1
        fills[i, p] = 0
        pg = pages[i, p]
        if pg < 0:
            continue
        f = 0
        while f < C and slots[i, p, f] >= 0:
            f += 1
        fills[i, p] = f
        hit = -1
        k = (pg * 0x9E3779B1) & (T - 1)
        while table[k] >= 0:
            j = table[k]
            k = (k + 1) & (T - 1)
            if res_page[lane, j] != pg or used[j]:
                continue
            same = True
            for t in range(C):
                if res_slots[lane, j, t] != (slots[i, p, t] if t < f else -1):
                    same = False
                    break
            if same:
                hit = j
                break
            res_stamp[lane, j] = -1  # a stale copy of this page (its tokens changed): the first victim
        if hit >= 0:
            used[hit] = True
            res_stamp[lane, hit] = stamp
            blocks[i, p] = lane * cap + hit
            hits += 1
        else:
            miss[nm] = p
            nm += 1
    if nm == 0:
        return 0, hits, 0
    # victims: the blocks this step does not use, least recently used first
    free = np.empty(cap, np.int64)
    nf = 0
    for j in range(cap):
        if not used[j]:
            free[nf] = j
            nf += 1
    free = free[:nf]
    if nf > nm:
        free = free[np.argsort(res_stamp[lane][free], kind="mergesort")]
    n_rows = 0
    for m in range(nm):
        p = miss[m]
        victim = free[m]
        res_page[lane, victim] = pages[i, p]
        res_stamp[lane, victim] = stamp
        f = fills[i, p]
        for t in range(C):
            res_slots[lane, victim, t] = slots[i, p, t] if t < f else -1
        blk = lane * cap + victim
        blocks[i, p] = blk
        for t in range(f):
            src_rows[out_at + n_rows] = slots[i, p, t] * n_kv_heads + h
            dst_rows[out_at + n_rows] = hot_base + blk * C + t
            n_rows += 1
    return n_rows, hits, nm


@numba.njit(parallel=True, cache=True)
def _assign(lanes, heads, pages, slots, n_kv_heads, hot_base, res_page, res_slots, res_stamp, stamp,
            blocks, fills, src_rows, dst_rows):  # pragma: no cover - compiled
    """Every lane in parallel (lanes are distinct, so each touches only its own rows of the map); each
    writes its rows into its own region, then the regions are packed."""
    BH, P = pages.shape
    C = slots.shape[2]
    per = P * C
    counts = np.zeros((BH, 3), np.int64)
    scratch_src = np.empty(BH * per, np.int64)
    scratch_dst = np.empty(BH * per, np.int64)
    for i in numba.prange(BH):
        r, hts, ms = _assign_lane(i, lanes[i], heads[i], pages, slots, n_kv_heads, hot_base, res_page, res_slots,
                                  res_stamp, stamp, blocks, fills, scratch_src, scratch_dst, i * per)
        counts[i, 0] = r
        counts[i, 1] = hts
        counts[i, 2] = ms
    offsets = np.zeros(BH + 1, np.int64)
    for i in range(BH):
        offsets[i + 1] = offsets[i] + counts[i, 0]
    max_src = np.full(BH, -1, np.int64)
    for i in numba.prange(BH):
        o = offsets[i]
        m = -1
        for k in range(counts[i, 0]):
            r = scratch_src[i * per + k]
            src_rows[o + k] = r
            dst_rows[o + k] = scratch_dst[i * per + k]
            m = max(m, r)
        max_src[i] = m
    return offsets[BH], counts[:, 1].sum(), counts[:, 2].sum(), max_src.max()


@dataclass
class HotAssignment:
    """Where each selected page sits in the hot cache this step, and the rows to load."""

    blocks: np.ndarray  # [BH, P] int32 block ids (-1: no page)
    fills: np.ndarray  # [BH, P] int32 tokens per page
    src_rows: np.ndarray  # [n] host rows (slot * H + h) of the missed pages' tokens
    dst_rows: np.ndarray  # [n] device rows (hot_base + block * C + t)
    hits: int
    misses: int
    max_src_row: int = -1  # the largest of src_rows (-1: none), so loaders need not scan them again


class HotPageMap:
    """The resident pages of ``n_lanes`` lanes of ``cap`` blocks of ``page_size`` tokens each."""

    def __init__(self, n_lanes: int, cap: int, page_size: int, n_kv_heads: int, hot_base: int = 0):
        self.cap, self.page_size, self.n_kv_heads, self.hot_base = cap, page_size, n_kv_heads, hot_base
        self.res_page = np.full((n_lanes, cap), -1, np.int64)
        self.res_slots = np.full((n_lanes, cap, page_size), -1, np.int64)
        self.res_stamp = np.zeros((n_lanes, cap), np.int64)
        self.stamp = 0

    @property
    def rows(self) -> int:
        """Device rows the cache needs: one block of ``page_size`` rows per (lane, block)."""
        return self.res_page.size * self.page_size

    def lanes(self, req_rows: np.ndarray, anchor_index: int = 0, n_anchors: int = 1
              ) -> tuple[np.ndarray, np.ndarray]:
        """Lane ids and KV heads of ``[B, H]`` (request row-major)."""
        H = self.n_kv_heads
        r = np.asarray(req_rows, np.int64)[:, None]
        h = np.arange(H, dtype=np.int64)[None, :]
        lanes = (r * n_anchors + anchor_index) * H + h
        return lanes.reshape(-1), np.broadcast_to(h, lanes.shape).reshape(-1).copy()

    def assign(self, lanes: np.ndarray, heads: np.ndarray, pages: np.ndarray, slots: np.ndarray,
               out: tuple[np.ndarray, np.ndarray] | None = None) -> HotAssignment:
        """``pages [BH, P]`` (-1 padded) and ``slots [BH, P, C]`` (-1 padded) of each lane's selection.
        ``out``: (src, dst) arrays to write the rows into (a loader's pinned index buffers, see
        :meth:`PageLoader.row_buffers`), else new int64 arrays."""
        BH, P = pages.shape
        if P > self.cap:
            raise ValueError(f"{P} selected pages do not fit {self.cap} blocks per lane")
        if lanes.max(initial=-1) >= self.res_page.shape[0]:
            raise ValueError("lane id beyond the map")
        if len(np.unique(lanes)) != len(lanes):
            raise ValueError("a lane appears twice in one step")
        self.stamp += 1
        blocks = np.empty((BH, P), np.int32)
        fills = np.empty((BH, P), np.int32)
        if out is None:
            src = np.empty(BH * P * self.page_size, np.int64)
            dst = np.empty_like(src)
        else:
            src, dst = out
            if min(len(src), len(dst)) < BH * P * self.page_size:
                raise ValueError(f"row buffers of {min(len(src), len(dst))} cannot hold {BH * P * self.page_size} rows")
        n, hits, misses, max_src = _assign(np.ascontiguousarray(lanes, np.int64), np.ascontiguousarray(heads, np.int64),
                                  np.ascontiguousarray(pages), np.ascontiguousarray(slots),  # int32 or int64
                                  self.n_kv_heads, self.hot_base, self.res_page, self.res_slots, self.res_stamp,
                                  self.stamp, blocks, fills, src, dst)
        return HotAssignment(blocks, fills, src[:n], dst[:n], int(hits), int(misses), int(max_src))

    def reset(self, lanes: np.ndarray | None = None) -> None:
        """Forget what ``lanes`` (all when None) hold: their request row was freed or reused."""
        sel = slice(None) if lanes is None else np.asarray(lanes, np.int64)
        self.res_page[sel] = -1
        self.res_slots[sel] = -1
        self.res_stamp[sel] = 0
