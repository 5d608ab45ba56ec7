"""The device KV pool of the offloaded decode: a fixed number of lanes, each holding one decoding request's
attended rows (sink + selected pages + recent tokens) of every layer, filled from the host pool.

With ``offload`` on, SGLang's KV pool (host memory: ``kv_pool.py``) holds every token; decode attention
reads only this pool. Its size is fixed at launch (``device_kv_tokens`` rows per layer and KV head, cut
into lanes of ``lane_rows``), independent of context length and of how many sessions the host pool keeps.

A lane belongs to one ``req_to_token`` row while that request decodes. Per anchor layer (its plan serves
the layers that reuse it) and KV head, a lane's rows remember which host slot they hold: at each step the
plan's slots are matched against them, hits stay where they are and only the misses are copied host ->
device (with the decode's new token, a selection's new pages). A lane is emptied when its row is freed, and
a slot SGLang frees while its request keeps decoding (a prompt's duplicate of a cached prefix, freed once the
row is re-pointed to the cache's slots; beam search's orphans) is forgotten by every lane: each slot has a
generation, bumped when SGLang frees it (:meth:`DeviceKVPool.slots_freed`, O(slots freed)), and a resident
row counts as a hit only while the generation it was loaded at is the slot's, so a resident row never stands
for KV a slot no longer holds.

Layout per layer: one ``[1 + lanes * lane_rows, H, D]`` tensor for K and one for V (row 0 is padding);
each KV head uses its own rows independently, which is what the sparse decode attention reads
(``DecodePlan.slots [B, H, T]`` holds device rows here instead of host slots).

The matching runs on the host, as the hot-page map of ``runtime/offload/`` does, because the selections
arrive there and what to read from host memory must be known before any copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np
import torch

from ..transfer import to_device


@numba.njit(cache=True)
def _map_rows(res, res_gen, slot_gen, lanes, slots, valid, out_rows, miss_row, miss_slot,
              miss_head):  # pragma: no cover
    """Match each (request, KV head)'s plan slots against its lane's resident slots ``res [lanes, H, R]``
    (loaded at generations ``res_gen``; one whose slot was freed since, ``slot_gen``, is no hit: the plan's
    slots are checked, not every resident row); give each miss a row the plan does not need (empty rows
    first, then rows it does not name). Writes ``out_rows [B, H, T]`` (global device rows, 0 where invalid)
    and the misses; returns (misses, hits)."""
    B, H, T = slots.shape
    R = res.shape[2]
    tsize = 1
    while tsize < 2 * R:
        tsize *= 2
    table = np.empty(tsize, np.int64)
    used = np.zeros(R, np.bool_)
    nm = 0
    hits = 0
    for b in range(B):
        lane = lanes[b]
        base = 1 + lane * R
        for h in range(H):
            table[:] = -1
            for r in range(R):
                s = res[lane, h, r]
                used[r] = False
                if s >= 0:
                    k = (s * 0x9E3779B1) & (tsize - 1)
                    while table[k] >= 0:
                        k = (k + 1) & (tsize - 1)
                    table[k] = r
            first_miss = nm
            for t in range(T):
                out_rows[b, h, t] = 0
                if not valid[b, h, t]:
                    continue
                s = slots[b, h, t]
                gen = slot_gen[s]
                k = (s * 0x9E3779B1) & (tsize - 1)
                found = -1
                while table[k] >= 0:
                    r = table[k]
                    # a slot named twice takes its second copy; a row loaded before the slot was freed is stale
                    if res[lane, h, r] == s and not used[r] and res_gen[lane, h, r] == gen:
                        found = r
                        break
                    k = (k + 1) & (tsize - 1)
                if found >= 0:
                    used[found] = True
                    out_rows[b, h, t] = base + found
                    hits += 1
                else:  # a miss (or a slot the plan names twice: it gets a second row)
                    miss_row[nm] = t  # the plan position, for now
                    miss_slot[nm] = s
                    miss_head[nm] = h
                    nm += 1
            # misses take the rows this step does not need: empty rows first, then stale ones
            r = 0
            for pass_ in range(2):
                for i in range(first_miss, nm):
                    if miss_row[i] < 0:
                        continue  # placed in the first pass
                    while r < R and (used[r] or (pass_ == 0 and res[lane, h, r] >= 0)):
                        r += 1
                    if r == R:
                        break
                    used[r] = True
                    res[lane, h, r] = miss_slot[i]
                    res_gen[lane, h, r] = slot_gen[miss_slot[i]]
                    out_rows[b, h, miss_row[i]] = base + r
                    miss_row[i] = -(base + r) - 1  # placed: remember the row, flagged
                r = 0
            for i in range(first_miss, nm):
                if miss_row[i] >= 0:  # no row left: the lane is smaller than the plan (checked by the caller)
                    return -1, hits
                miss_row[i] = -miss_row[i] - 1
    return nm, hits


class Misses(NamedTuple):
    """The (device row, host slot, KV head) triples one plan must copy, for every layer of its group:
    made once per plan, its device indices moved once, then used by each layer's :meth:`DeviceKVPool.load`."""

    rows: torch.Tensor  # device rows (CPU)
    slots: torch.Tensor  # host pool slots (CPU)
    heads: torch.Tensor  # KV heads (CPU)
    rows_dev: torch.Tensor  # ``rows`` on the device pool's device
    heads_dev: torch.Tensor
    src_dev: torch.Tensor | None = None  # a GPU reading a pinned host pool: host rows ``slot * H + head`` ...
    dst_dev: torch.Tensor | None = None  # ... into device rows ``row * H + head``, on the device


@dataclass
class LoadStats:
    rows_loaded: int = 0  # (slot, KV head) rows copied host -> device, one layer
    rows_hit: int = 0  # rows the lanes already held


class DeviceKVPool:
    """Decode lanes on ``device`` for ``num_layers`` layers; ``groups[layer]`` names the plan (anchor layer)
    each layer's rows follow."""

    def __init__(self, *, num_layers: int, groups: dict[int, int], lanes: int, lane_rows: int, head_num: int,
                 head_dim: int, v_head_dim: int, dtype: torch.dtype, device: torch.device | str, num_slots: int):
        if lanes < 1 or lane_rows < 1:
            raise ValueError(f"the device pool needs at least one lane of one row, got {lanes} x {lane_rows}")
        self.lanes, self.lane_rows, self.H = lanes, lane_rows, head_num
        self.device = torch.device(device)
        self.groups = dict(groups)
        rows = 1 + lanes * lane_rows
        self.k = {layer: torch.zeros(rows, head_num, head_dim, dtype=dtype, device=self.device) for layer in groups}
        self.v = {layer: torch.zeros(rows, head_num, v_head_dim, dtype=dtype, device=self.device) for layer in groups}
        self.resident = {g: np.full((lanes, head_num, lane_rows), -1, np.int64) for g in set(groups.values())}
        self.resident_gen = {g: np.zeros((lanes, head_num, lane_rows), np.int32) for g in self.resident}
        self.slot_gen = np.zeros(num_slots, np.int32)  # bumped when SGLang frees the slot (``slots_freed``)
        self.lane_of: dict[int, int] = {}  # req_to_token row -> lane
        self._free = list(range(lanes - 1, -1, -1))
        self.nbytes = sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())
        self.stats = LoadStats()
        self._direct: bool | None = None  # see ``reads_host_directly``

    # ------------------------------------------------------------------ lanes
    def lanes_for(self, req_rows) -> np.ndarray:
        """The lane of each request row of a decode batch. A new request takes a free lane, else the lane of
        a row outside this batch (a paused request reloads its rows when it decodes again). SGLang runs at
        most ``lanes`` requests (``patches/cli.py``), so only a batch larger than the pool is refused."""
        rows = [int(r) for r in req_rows]
        if len(set(rows)) > self.lanes:
            raise RuntimeError(f"a decode batch of {len(set(rows))} requests does not fit the device pool's "
                               f"{self.lanes} lanes; the scheduler must not run more requests than that")
        batch = set(rows)
        out = np.empty(len(rows), np.int64)
        for i, row in enumerate(rows):
            lane = self.lane_of.get(row)
            if lane is None:
                if not self._free:
                    self.release(next(r for r in self.lane_of if r not in batch))
                lane = self.lane_of[row] = self._free.pop()
            out[i] = lane
        return out

    def release(self, req_row: int) -> None:
        lane = self.lane_of.pop(int(req_row), None)
        if lane is not None:
            for res in self.resident.values():
                res[lane] = -1
            self._free.append(lane)

    def clear(self) -> None:
        for row in list(self.lane_of):
            self.release(row)

    def slots_freed(self, slots) -> None:
        """SGLang freed these KV slots (``runtime/events.py``): no lane may count them as held any more (they
        may be handed out again, even to a request that keeps its lane). Their generations move on, so a row
        loaded before no longer matches (checked when a plan is mapped); O(slots freed)."""
        s = np.asarray(slots, np.int64).reshape(-1)
        self.slot_gen[s[(s >= 0) & (s < len(self.slot_gen))]] += 1

    @property
    def lanes_in_use(self) -> int:
        return len(self.lane_of)

    # ------------------------------------------------------------------ one step
    def map_plan(self, group: int, lanes: np.ndarray, slots: np.ndarray, valid: np.ndarray) -> tuple:
        """Device rows for a plan's host slots ``[B, H, T]``; returns (rows [B, H, T], :class:`Misses`), the
        rows each layer of the group copies."""
        B, H, T = slots.shape
        if T > self.lane_rows:
            raise RuntimeError(f"a plan of {T} rows per KV head does not fit a lane of {self.lane_rows}")
        rows = np.zeros((B, H, T), np.int64)
        n = B * H * T
        m_row, m_slot, m_head = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
        nm, hits = _map_rows(self.resident[group], self.resident_gen[group], self.slot_gen,
                             np.ascontiguousarray(lanes, np.int64),
                             np.ascontiguousarray(slots, np.int64), np.ascontiguousarray(valid), rows,
                             m_row, m_slot, m_head)
        if nm < 0:
            raise RuntimeError("a plan names more rows than its lane holds")
        self.stats.rows_hit += int(hits)
        r, h = torch.from_numpy(m_row[:nm]), torch.from_numpy(m_head[:nm])
        src = dst = None
        if self.reads_host_directly:
            src = to_device(m_slot[:nm] * H + m_head[:nm], self.device)
            dst = to_device(m_row[:nm] * H + m_head[:nm], self.device)
        return rows, Misses(r, torch.from_numpy(m_slot[:nm]), h, to_device(m_row[:nm], self.device),
                            to_device(m_head[:nm], self.device), src, dst)

    @property
    def reads_host_directly(self) -> bool:
        """Whether misses are read from the host pool by the device itself (a GPU and a pinned host pool: one
        Triton kernel per plane, no host gather). Tests set ``_direct`` to run that path on the CPU under
        Triton's interpreter."""
        return self._direct if self._direct is not None else self.device.type == "cuda"

    def load(self, layer: int, misses: Misses, host_k: torch.Tensor, host_v: torch.Tensor) -> int:
        """Copy one layer's missed rows from the host pool; returns how many."""
        n = len(misses.rows)
        if n == 0:
            return 0
        if misses.src_dev is not None:  # the device reads the pinned host rows itself (``reads_host_directly``)
            from icecache_sglang.kernels import copy_rows

            for host, dev in ((host_k, self.k[layer]), (host_v, self.v[layer])):
                copy_rows(host.view(-1, host.shape[-1]), dev.view(-1, dev.shape[-1]), misses.src_dev, misses.dst_dev)
        else:
            s, h = misses.slots.to(host_k.device), misses.heads.to(host_k.device)  # no-ops for a host pool
            self.k[layer][misses.rows_dev, misses.heads_dev] = host_k[s, h].to(self.device, non_blocking=True)
            self.v[layer][misses.rows_dev, misses.heads_dev] = host_v[s, h].to(self.device, non_blocking=True)
        self.stats.rows_loaded += n
        return n

