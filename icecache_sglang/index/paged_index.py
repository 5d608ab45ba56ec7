"""``PagedDCIIndex``: the paged multi-level DCI index of all KV heads of one layer.

Tokens are shared by all heads (token id = insertion order; ``positions`` maps ids to the caller's
positions or KV slots); each head has its own tree, page layout and page ids. See
``docs/architecture.md`` for where it sits and :mod:`.pagetable` / :mod:`.search` for the kernels.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit, prange
from numba.typed import List

from . import pagetable as pt
from .config import MAX_LEVELS, IndexConfig, QueryParams
from .gqa_merge import merge_rows
from .keys import STORAGE, channel_scales, from_storage, scaled_int8, stored_width, to_storage
from .layout import bisect_cells, sort_by
from .schedule import schedule_levels
from .search import search_batch
from .transform import (
    augmented_parents,
    exact_parents,
    key_projection,
    make_projection,
    query_projection,
    segment_bounds,
    segmented_parents,
    squared_norms,
)


#: capacity is grown by this factor when inserts outgrow it (amortized: each token or page is copied at most
#: ``1 / (GROWTH - 1)`` times over the index's life)
GROWTH = 1.25
#: a parent search of at least this many multiply-adds per head (children x parents x (d + 1)) runs its heads
#: side by side (one head's BLAS calls per thread); below it, starting the threads costs what they save (8 KV
#: heads x 128, 2 cores, one-thread BLAS, median of 15: a 4096-token build, 22 M, 32.1 vs 30.1 ms one head
#: after another; 8192, 87 M, 64.2 vs 65.9 ms; 16384, 133 vs 148 ms)
PARALLEL_PARENTS_MIN = 1 << 25
#: a build leaves room for this share more tokens and pages (the first decode steps' inserts and page splits)
BUILD_SLACK = 1 / 16


def _grown(n: int) -> int:
    return n + max(16, int(n * (GROWTH - 1)))


def _slack(n: int) -> int:
    return max(16, int(n * BUILD_SLACK))


def _as_float_array(name: str, x, ndim: int) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a numeric array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


class PagedDCIIndex:
    """Per-layer index over ``num_heads`` KV heads of dimension ``head_dim``.

    >>> idx = PagedDCIIndex(num_heads=2, head_dim=64)
    >>> idx.build(K)                       # K: [H, n, d]  (V optional: [H, n, dv])
    >>> pages = idx.query(Q, n_pages=12)   # Q: [Hq, d] with Hq a multiple of H -> [H, 12] page ids
    """

    def __init__(self, num_heads: int, head_dim: int, value_dim: int = 0, config: IndexConfig | None = None):
        for name, v, lo in (("num_heads", num_heads, 1), ("head_dim", head_dim, 1), ("value_dim", value_dim, 0)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        self.H = int(num_heads)
        self.d = int(head_dim)
        self.dv = int(value_dim)
        self.cfg = config or IndexConfig()
        self.C = self.cfg.page_size
        self.u = make_projection(self.d, self.cfg.seed)
        self._u0 = np.ascontiguousarray(self.u[0])  # the first direction [w ; a]: what a lift projects on
        self._bisect = self.cfg.layout == "bisect"
        # an int8 index stores keys / key_scale (per head and channel, fixed at a build: a state array, 1 for
        # the other dtypes) and scores stored rows against queries * key_scale: the same scores. Its tree
        # (norms, projections, parents, pages) is over the keys themselves, as kept (scale multiplied back)
        self._channel_scaled = self.cfg.storage_dtype == "int8"
        #: the query-aware low-rank codes of the exact selection's first pass (``lowrank.py``), started by the
        #: first such query of a long index; kept per page slot and keyed by ``page_version``, so they outlive a
        #: rebuild (every page coded again)
        self.lowrank = None
        self._alloc(0, 0)

    # ------------------------------------------------------------------ storage
    def _spec(self, field: str) -> tuple[str, tuple, type, int]:
        """(axis kind, trailing shape, dtype, fill) of a state array; "tok"/"cell"/"page"/"slot" arrays grow
        along axis 1 (tokens, tokens + root, pages, cell slots: ``pagetable.cell_slot``), "head" arrays do not
        grow."""
        C = self.C
        return {
            "tok_level": ("tok", (), np.int8, -1), "tok_parent": ("tok", (), np.int32, -2),
            "tok_page": ("tok", (), np.int32, -1), "tok_slot": ("tok", (), np.int32, -1),
            "tok_proj": ("tok", (), pt.TREE_FLOAT, 0),
            "tok_sqn": ("tok", (), pt.TREE_FLOAT, 0),
            "cell_first": ("slot", (), np.int32, -1), "cell_last": ("slot", (), np.int32, -1),
            "cell_nchild": ("slot", (), np.int32, 0), "cell_m": ("slot", (), pt.TREE_FLOAT, 0),
            "cnt_desc": ("slot", (), np.int32, 0), "cnt_pages": ("slot", (), np.int32, 0),
            "tok_cell": ("cell", (), np.int32, -1),
            "page_tok": ("page", (C,), np.int32, -1), "page_fill": ("page", (), np.int32, 0),
            "page_cell": ("page", (), np.int32, -1), "page_next": ("page", (), np.int32, -1),
            "page_prev": ("page", (), np.int32, -1), "page_version": ("page", (), np.uint32, 0),
            "free_stack": ("page", (), np.int32, 0), "free_n": ("head", (), np.int32, 0),
            "next_page": ("head", (), np.int32, 0), "page_keys": ("page", (C, stored_width(self.d, self.cfg.storage_dtype)), STORAGE[self.cfg.storage_dtype], 0),
            "page_vals": ("page", (C, self.dv), np.float32, 0), "page_proj": ("page", (C,), pt.TREE_FLOAT, 0),
            "tok_pkey": ("tok", (), pt.TREE_FLOAT, 0), "key_scale": ("head", (self.d,), np.float32, 1),
        }[field]

    def _next_version(self) -> int:
        """A page version past every one so far: page versions never repeat within an index's life, so a version
        seen before (``dirty_pages``, ``lowrank``'s codes) never matches a page whose arrays were replaced
        (``_alloc``) or whose id is new (``_grow``)."""
        v = getattr(self, "page_version", None)
        return int(v.max()) + 1 if v is not None and v.size else 0

    def _alloc(self, tok_cap: int, page_cap: int, slot_cap: int = 16) -> None:
        T, P, NS = max(tok_cap, 16), max(page_cap, 16), max(slot_cap, 16)
        version_base = self._next_version()
        self.storage_version = getattr(self, "storage_version", -1) + 1  # state arrays replaced
        self._state_list_cache = None  # (see _state_list) it names the replaced arrays
        self.n_tokens = 0  # ids handed out
        self.alive = np.zeros(T, bool)
        self.positions = np.full(T, -1, np.int64)
        self.M = np.zeros(self.H, np.float64)
        self.n_at_build = 0
        #: token ids that start the last build's runs of level-0 parent search (after the first run): a level-0
        #: token built there has its parent among its run's level-1 tokens (``IndexConfig.parent_segment``)
        self.run_starts = np.empty(0, np.int64)
        self.rebuilds = 0
        self._level1_cache: dict = {}
        self.level_counts = np.zeros((self.H, MAX_LEVELS), np.int64)
        length = {"tok": (T,), "cell": (T + 1,), "page": (P,), "slot": (NS,), "head": ()}
        for f in pt.STATE_FIELDS:
            kind, tail, dtype, fill = self._spec(f)
            shape = (self.H,) + length[kind] + tail
            # zeros come from the allocator lazily (np.full would write every byte of the page arrays)
            setattr(self, f, np.zeros(shape, dtype) if fill == 0 else np.full(shape, fill, dtype))
        self.page_version[:] = version_base
        self.tok_cell[:, 0] = 0  # the root's slot
        #: cell slots handed out (``pagetable.cell_slot``; slot 0 is the root's) and the LIFO of released ones
        self.next_slot = np.ones(self.H, np.int64)
        self.free_slots = np.zeros((self.H, NS), np.int32)
        self.n_free_slots = np.zeros(self.H, np.int64)

    @property
    def state(self) -> tuple:
        return tuple(getattr(self, f) for f in pt.STATE_FIELDS)

    def _grow(self, need_tokens: int, need_pages: int, need_slots: int = 0) -> None:
        """Make room for ``need_tokens`` token ids, ``need_pages`` page ids and ``need_slots`` cell slots, growing
        by ``GROWTH`` (a decode step's insert past the capacity made the index of a whole prompt twice its size
        when this doubled)."""
        T, P, NS = self.alive.shape[0], self.page_fill.shape[1], self.cell_first.shape[1]
        more_t = max(need_tokens, _grown(T)) - T if need_tokens > T else 0
        more_p = max(need_pages, _grown(P)) - P if need_pages > P else 0
        more_s = max(need_slots, _grown(NS)) - NS if need_slots > NS else 0
        extra = {"tok": more_t, "cell": more_t, "page": more_p, "slot": more_s, "head": 0}
        if more_t or more_p or more_s:
            self.storage_version += 1
            self._state_list_cache = None
        if more_s:
            self.free_slots = np.concatenate([self.free_slots, np.zeros((self.H, more_s), np.int32)], axis=1)
        if extra["tok"]:
            self.alive = np.concatenate([self.alive, np.zeros(extra["tok"], bool)])
            self.positions = np.concatenate([self.positions, np.full(extra["tok"], -1, np.int64)])
        for f in pt.STATE_FIELDS:
            kind, tail, dtype, fill = self._spec(f)
            if extra[kind]:
                a = getattr(self, f)
                if f == "page_version":  # (a rebuild's fresh arrays may be smaller than the ids it grows back to)
                    fill = self._next_version()
                setattr(self, f, np.concatenate([a, np.full((self.H, extra[kind]) + tail, fill, dtype)], axis=1))

    def _give_slot(self, h: int, t: int) -> None:
        """Give token ``t`` (just raised above level 0) a cell slot of head ``h``: a released one, else the next,
        the slot arrays grown by ``GROWTH`` when full. Its cell starts empty."""
        if self.tok_cell[h, t + 1] >= 0:
            return
        if self.n_free_slots[h] > 0:
            self.n_free_slots[h] -= 1
            slot = int(self.free_slots[h, self.n_free_slots[h]])
        else:
            slot = int(self.next_slot[h])
            self._grow(0, 0, slot + 1)
            self.next_slot[h] += 1
        self.cell_first[h, slot] = self.cell_last[h, slot] = -1
        self.cell_nchild[h, slot] = self.cnt_pages[h, slot] = 0
        self.cell_m[h, slot] = 0
        self.cnt_desc[h, slot] = 1  # the token itself
        self.tok_cell[h, t + 1] = slot

    def cell_array(self, name: str, h: int) -> np.ndarray:
        """Head ``h``'s cell array ``name`` (``cell_first``, ``cell_last``, ``cell_nchild``, ``cell_m``,
        ``cnt_desc``, ``cnt_pages``) by cell id (token id + 1; 0: the root) for every token id handed out, a
        token without a slot read as a level-0 token (no pages, no children, a subtree of itself). For checks
        and tests: the index keeps only the slots (``pagetable.cell_slot``)."""
        default = {"cell_first": -1, "cell_last": -1, "cell_nchild": 0, "cell_m": 0, "cnt_desc": 1,
                   "cnt_pages": 0}[name]
        arr = getattr(self, name)[h]
        slots = self.tok_cell[h, : self.n_tokens + 1]
        return np.where(slots >= 0, arr[np.maximum(slots, 0)], default).astype(arr.dtype)

    def _release_slot(self, h: int, t: int) -> None:
        """Token ``t`` of head ``h`` left the tree (its cell empty): its slot goes back to the free list."""
        slot = int(self.tok_cell[h, t + 1])
        if slot > 0:
            self.free_slots[h, self.n_free_slots[h]] = slot
            self.n_free_slots[h] += 1
            self.tok_cell[h, t + 1] = -1

    def copy(self) -> PagedDCIIndex:
        """An independent deep copy (copy-on-write sharing of one sequence's index by another)."""
        new = object.__new__(type(self))
        for k, v in list(self.__dict__.items()):  # a snapshot: a query of the original may run meanwhile
            new.__dict__[k] = v.copy() if isinstance(v, (np.ndarray, dict)) else v
        new._state_list_cache = None  # it names this index's arrays
        if self.lowrank is not None:
            new.lowrank = self.lowrank.copy()
        return new

    @property
    def n_live(self) -> int:
        return int(self.alive[: self.n_tokens].sum())

    def live_ids(self) -> np.ndarray:
        """Live token ids in insertion order."""
        return np.flatnonzero(self.alive[: self.n_tokens])

    def nbytes(self) -> int:
        own = sum(a.nbytes for a in self.__dict__.values() if isinstance(a, np.ndarray))
        return int(own + (self.lowrank.nbytes() if self.lowrank is not None else 0))

    # ------------------------------------------------------------------ checks
    def _check_kv(self, keys, values, n_expected: int | None = None, fit_scale: bool = False):
        """Validated ``K`` (float32: the keys as the index keeps them, rounded to the key dtype), ``V``, the
        key rows in the storage dtype (int8: ``K / scale``) and the channel scales used: fitted to these keys
        when ``fit_scale`` (a build of an int8 index), else ``key_scale``."""
        K = _as_float_array("keys", keys, 3)
        if K.shape[0] != self.H or K.shape[2] != self.d:
            raise ValueError(f"keys must have shape [num_heads={self.H}, n, head_dim={self.d}], got {K.shape}")
        scale = channel_scales(K) if fit_scale and self._channel_scaled else self.key_scale
        if n_expected is not None and K.shape[1] != n_expected:
            raise ValueError(f"keys has {K.shape[1]} tokens, expected {n_expected}")
        if self.dv == 0:
            if values is not None:
                raise ValueError("values given but the index was made with value_dim=0")
            V = np.zeros((self.H, K.shape[1], 0), np.float32)
        else:
            if values is None:
                raise ValueError(f"values of shape [{self.H}, n, {self.dv}] are required (value_dim={self.dv})")
            V = _as_float_array("values", values, 3)
            if V.shape != (self.H, K.shape[1], self.dv):
                raise ValueError(f"values must have shape {(self.H, K.shape[1], self.dv)}, got {V.shape}")
        # the rows as the pages store them; a bfloat16 index is a float32 index over the rounded keys (an int8
        # one over the dequantized keys), so everything downstream (norms, projections, parents) sees those
        stored, K = self._store(K, scale)
        return K, np.ascontiguousarray(V), stored, scale

    def _store(self, K: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys ``K [H, n, d]`` -> (the rows the pages store, the float32 keys those rows stand for)."""
        if self._channel_scaled:
            return scaled_int8(K, scale)
        stored = to_storage(K, self.cfg.storage_dtype)
        return stored, (from_storage(stored) if stored.dtype != np.float32 else stored)

    def _check_positions(self, positions, n: int) -> np.ndarray:
        if positions is None:
            return np.arange(self.n_tokens, self.n_tokens + n, dtype=np.int64)
        pos = np.asarray(positions)
        if pos.dtype.kind not in "iu" or pos.shape != (n,):
            raise ValueError(f"positions must be an integer array of shape ({n},), got {pos.dtype} {pos.shape}")
        return pos.astype(np.int64)

    # ------------------------------------------------------------------ build
    def build(self, keys, values=None, positions=None) -> None:
        """Index ``n`` tokens from scratch: levels -> exact parents -> sorted cells -> pages."""
        K, V, stored, scale = self._check_kv(keys, values, fit_scale=True)  # keys validated once
        self.lowrank = None  # token ids start again
        n = K.shape[1]
        pos = self._check_positions(positions, n) if positions is not None else np.arange(n, dtype=np.int64)
        self._build_from(K, V, pos, np.arange(n, dtype=np.int64), stored, scale)

    def _build_from(self, K: np.ndarray, V: np.ndarray, pos: np.ndarray, tids: np.ndarray,
                    stored: np.ndarray | None = None, scale: np.ndarray | None = None) -> None:
        """Bulk build over tokens ``tids`` (ascending; ids are kept, so a rebuild renames nothing) of keys
        ``K`` as kept; ``stored``: ``K`` in the storage dtype when the caller has it; ``scale``: the channel
        scales of an int8 index (default: the current ones)."""
        scale = (self.key_scale if scale is None else scale).copy()
        n = K.shape[1]
        n_ids = int(tids[-1]) + 1 if n else 0
        level = schedule_levels(n, self.cfg.level0_prob, self.cfg.p_up)
        top = int(level.max()) if n else -1
        by_level = [np.flatnonzero(level == lv) for lv in range(top + 1)]
        sqn = squared_norms(K)
        M = sqn.max(axis=1) if n else np.zeros(self.H)
        proj = np.empty((self.H, n), pt.TREE_FLOAT)  # rounded as stored: the cells are sorted by what they keep
        parent = np.full((self.H, n), -1, np.int64)  # parent token id, -1 = root
        need_pages = 1
        runs = segment_bounds(n, self.cfg.parent_segment)  # level 0's parents: within runs of the build order

        def parents_of(h: int) -> None:  # NumPy and BLAS only (they release the GIL): heads run side by side
            # (the squared norms are passed in: computing them would start numba's parallel kernel here)
            for lv in range(top):
                members, ups = by_level[lv], by_level[lv + 1]
                bounds = runs if lv == 0 else runs[[0, -1]]
                parent[h, members] = tids[ups[segmented_parents(members, ups, K[h], M[h], bounds,
                                                                self.cfg.parent_chunk, sqn[h])]]

        for h in range(self.H):
            proj[h] = key_projection(K[h], sqn[h], M[h], self.u)
        # one head's level-0 search (the bulk): each child against the parents of its run
        madds = len(by_level[0]) * len(by_level[1]) * (runs[1] - runs[0]) / n * (self.d + 1) if top > 0 else 0
        _each_head(parents_of, self.H, madds)
        for h in range(self.H):
            sizes = np.bincount(parent[h] + 1)
            need_pages = max(need_pages, int(((sizes + self.C - 1) // self.C).sum()))
        uppers = tids[level >= 1]  # the tokens with children (and the root) get cell slots, in token order
        n_cells = 1 + uppers.size
        self._alloc(n_ids + _slack(n_ids), need_pages + _slack(need_pages), n_cells + _slack(n_cells))
        self.tok_cell[:, uppers + 1] = np.arange(1, n_cells, dtype=np.int32)
        self.next_slot[:] = n_cells
        self.n_tokens = n_ids
        self.alive[tids] = True
        self.positions[tids] = pos
        self.n_at_build = n
        self.run_starts = tids[runs[1:-1]].astype(np.int64)
        self.M[:] = M
        self.key_scale[:] = scale
        S = self.state
        if stored is None:
            stored = self._store(K, scale)[0]
        # each head's local indices by cell, then by projection, then by token id (every head at once)
        orders, cells_sorted = _cell_orders(parent, proj, n_ids)
        for h in range(self.H):
            if self._bisect:  # cut the keys as the index keeps them (rounded, as they are read back)
                bisect_cells(orders[h], cells_sorted[h], np.ascontiguousarray(K[h], np.float32), self.C)
            self.level_counts[h, : top + 1] = [len(b) for b in by_level]
        # every head's pages at once (a head's layout touches only its own rows of the state)
        _build_heads(S, tids.astype(np.int32), orders, cells_sorted, stored, np.ascontiguousarray(V), level,
                     parent.astype(np.int32), proj, sqn, M, self._bisect)

    # ------------------------------------------------------------------ insert / delete
    def insert(self, keys, values=None, positions=None) -> np.ndarray:
        """Append tokens (decode-time): each lands on level 0 under its exact ``D_kk``-nearest level-1
        token (or the root when the tree has one level), split pages as needed. Returns the new ids."""
        K, V, stored, _ = self._check_kv(keys, values)
        b = K.shape[1]
        pos = self._check_positions(positions, b)
        if b == 0:
            return np.empty(0, np.int64)
        n_alive = int(self.alive[: self.n_tokens].sum()) + b
        growth = self.cfg.rebuild_growth
        # deletes that emptied level 1 under higher levels leave a new token no level-1 parent: built again
        # (every decode step inserts: the common case, level 1 held in every head, is one small test)
        lc = self.level_counts
        hollow = not lc[:, 1].all() and bool(((lc[:, 1] == 0) & lc[:, 2:].any(axis=1)).any())
        if hollow or (growth is not None and
                      n_alive >= growth * max(self.n_at_build, math.ceil(1 / self.cfg.level0_prob))):
            return self._rebuild_with(K, V, pos)  # (low-rank codes: every page's version moved, coded again)
        tids = np.arange(self.n_tokens, self.n_tokens + b, dtype=np.int64)
        self._grow(self.n_tokens + b, int(self.next_page.max()) + b + 1)
        self.alive[tids] = True
        self.positions[tids] = pos
        self.n_tokens += b
        S = self.state
        parents = np.full((self.H, b), -1, np.int32)
        sqn = squared_norms(K)
        for h in range(self.H):
            self.M[h] = max(self.M[h], float(sqn[h].max()))
        level1 = [self._level1(h) for h in range(self.H)]

        def parents_of(h: int) -> None:  # NumPy and BLAS only, as the build's
            ups, up_aug_t = level1[h]
            if ups.size:
                parents[h] = ups[exact_parents(K[h], None, self.M[h], self.cfg.parent_chunk, sqn[h],
                                               parent_aug_t=up_aug_t)]

        _each_head(parents_of, self.H, b * len(level1[0][0]) * (self.d + 1))
        for h in range(self.H):
            self.tok_sqn[h, tids] = sqn[h]
            self.tok_proj[h, tids] = key_projection(K[h], sqn[h], self.M[h], self.u)
            self.tok_level[h, tids] = 0  # (level 0: no cell slot, ``pagetable.cell_slot``)
            self.level_counts[h, 0] += b
        _insert_heads(S, tids.astype(np.int32), parents, stored, V, self.M.astype(pt.TREE_FLOAT), self._u0,
                      self._bisect)
        return tids  # (low-rank codes: the pages changed have new versions, coded at the next query)

    def _level1(self, h: int) -> tuple[np.ndarray, np.ndarray]:
        """Level-1 token ids of head h and their augmented keys for the current M, cached: inserts land on
        level 0 and never change level 1; build, rebuild and delete drop the cache, a new M refreshes it."""
        cached = self._level1_cache.get(h)
        if cached is None or cached[0] != self.M[h]:
            ups = np.flatnonzero((self.tok_level[h, : self.n_tokens] == 1) & self.alive[: self.n_tokens])
            keys = self._key(h, ups)
            cached = (self.M[h], ups, augmented_parents(keys, self.M[h], self.tok_sqn[h, ups]))
            self._level1_cache[h] = cached
        return cached[1], cached[2]

    def _rebuild_with(self, K_new, V_new, pos_new) -> np.ndarray:
        """Rebuild over the live tokens and ``K_new`` (as kept). ``key_scale`` stays, unless it is still 1
        (an int8 index built over too few tokens to fit it) and there are enough now."""
        live = np.flatnonzero(self.alive[: self.n_tokens])
        K_old = self.keys_of(live)
        V_old = np.stack([self._val(h, live) for h in range(self.H)])
        pos = np.concatenate([self.positions[live], pos_new])
        new = np.arange(self.n_tokens, self.n_tokens + K_new.shape[1], dtype=np.int64)
        rebuilds, old_pages = self.rebuilds, int(self.next_page.max())
        K_all = np.concatenate([K_old, K_new], axis=1)
        scale = self.key_scale.copy()
        if self._channel_scaled and (scale == 1).all():
            scale = channel_scales(K_all)  # still 1 when there are too few tokens
        stored, K_all = self._store(K_all, scale)  # the tree over exactly what the rows hold
        self._build_from(K_all, np.concatenate([V_old, V_new], axis=1), pos, np.concatenate([live, new]), stored,
                         scale)
        self.rebuilds = rebuilds + 1
        self._grow(self.n_tokens, old_pages)  # (every page id reassigned or freed: all at new versions)
        return new

    def delete(self, token_ids) -> None:
        """Remove tokens (minimal [R] version): a leaf leaves its page (pages under C/2 borrow or
        merge); an inner token's children move to the nearest remaining token of its level, or, if it
        was the last of its level, its nearest child is promoted into its place."""
        ids = np.unique(np.asarray(token_ids, dtype=np.int64))
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_tokens or not self.alive[ids].all()):
            raise ValueError("token_ids must name live tokens of this index")
        self._level1_cache = {}
        for t in ids:
            for h in range(self.H):
                self._delete_one(h, int(t))
            self.alive[t] = False

    def _raw_key(self, h: int, t) -> np.ndarray:
        """Head h's stored key row(s) of token id(s) ``t`` (the index's key dtype)."""
        return self.page_keys[h, self.tok_page[h, t], self.tok_slot[h, t]]

    def _key(self, h: int, t) -> np.ndarray:
        """Head h's key row(s) of token id(s) ``t`` as float32, as the index keeps them (read from the pages)."""
        k = from_storage(self._raw_key(h, t))
        return np.ascontiguousarray(k * self.key_scale[h], dtype=np.float32) if self._channel_scaled else k

    def keys_of(self, token_ids: np.ndarray) -> np.ndarray:
        """Key rows of ``token_ids`` for every head -> ``[H, n, d]`` (read from the pages)."""
        return np.stack([self._key(h, token_ids) for h in range(self.H)])

    def scaled_queries(self, Q: np.ndarray, row_head: np.ndarray) -> np.ndarray:
        """Queries in the index's key space (row ``r`` times ``key_scale[row_head[r]]``): scores against the
        stored keys are scores against the given keys."""
        if not self._channel_scaled:
            return Q
        return np.ascontiguousarray(Q * self.key_scale[np.asarray(row_head)], dtype=np.float32)

    def _val(self, h: int, t) -> np.ndarray:
        return self.page_vals[h, self.tok_page[h, t], self.tok_slot[h, t]]

    def _children(self, h: int, t: int) -> np.ndarray:
        out = []
        slot = self.tok_cell[h, t + 1]
        p = self.cell_first[h, slot] if slot >= 0 else -1
        while p >= 0:
            out.extend(self.page_tok[h, p, : self.page_fill[h, p]].tolist())
            p = self.page_next[h, p]
        return np.asarray(out, dtype=np.int64)

    def _level_members(self, h: int, lv: int, exclude: int) -> np.ndarray:
        n = self.n_tokens
        m = (self.tok_level[h, :n] == lv) & (self.tok_parent[h, :n] != -2)
        m[exclude] = False
        return np.flatnonzero(m)

    def _nearest(self, h: int, tokens: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """For each token, the candidate token ``D_kk``-nearest to it (all -1 when there is none)."""
        if candidates.size == 0:
            return np.full(len(tokens), -1, np.int64)
        keys = self._key(h, tokens)
        cand_keys = self._key(h, candidates)
        return candidates[exact_parents(keys, cand_keys, self.M[h])]

    def _move(self, h: int, t: int, new_parent: int) -> None:
        """Move ``t`` (with its subtree) under ``new_parent``, re-projected with the current max norm."""
        if int(self.next_page[h]) + 1 > self.page_fill.shape[1]:  # attach may split a page (numba: no bounds check)
            self._grow(self.n_tokens, int(self.next_page[h]) + 1)
        S = self.state
        raw, val = self._raw_key(h, t).copy(), self._val(h, t).copy()
        pt.detach(S, h, t)
        key = from_storage(raw)
        if self._channel_scaled:
            key = np.ascontiguousarray(key * self.key_scale[h], dtype=np.float32)
        self.tok_proj[h, t] = key_projection(key[None], np.array([self.tok_sqn[h, t]]), self.M[h], self.u)[0]
        pt.attach(S, h, t, new_parent, raw, val, pt.TREE_FLOAT(self.M[h]), self._u0, self._bisect)

    def _vacate(self, h: int, t: int) -> None:
        """Re-home ``t``'s children so that ``t`` can leave its level (``t`` stays in its cell)."""
        kids = self._children(h, t)
        if kids.size == 0:
            return
        lv = int(self.tok_level[h, t])
        others = self._level_members(h, lv, exclude=t)
        if others.size:
            for c, p in zip(kids, self._nearest(h, kids, others)):
                self._move(h, int(c), int(p))
            return
        # t is the last token of its level: promote its nearest child into its place.
        y = int(self._nearest(h, np.array([t]), kids)[0])
        self._vacate(h, y)
        self.level_counts[h, lv - 1] -= 1
        self.level_counts[h, lv] += 1
        self.tok_level[h, y] = lv
        if lv == 1:
            self._give_slot(h, y)  # it will have children
        self._move(h, y, int(self._nearest(h, np.array([y]), self._level_members(h, lv + 1, exclude=t))[0]))
        for c in self._children(h, t):
            self._move(h, int(c), y)

    def _delete_one(self, h: int, t: int) -> None:
        self._vacate(h, t)
        pt.detach(self.state, h, t)
        self._release_slot(h, t)  # (its children were re-homed)
        self.level_counts[h, self.tok_level[h, t]] -= 1
        self.tok_level[h, t] = -1

    # ------------------------------------------------------------------ query
    def top_level(self) -> np.ndarray:
        nz = self.level_counts > 0
        return np.where(nz.any(axis=1), 63 - np.argmax(nz[:, ::-1], axis=1), -1).astype(np.int32)

    def query_rows(self, queries, row_head, n_pages: int, params: QueryParams | None = None):
        """Top-``n_pages`` pages (best first, -1 padded) and their best scores for each query row;
        ``row_head[r]`` names the KV head whose tree row ``r`` searches."""
        params = params or QueryParams()
        Q = _as_float_array("queries", queries, 2)
        if Q.shape[1] != self.d:
            raise ValueError(f"queries must have head_dim={self.d} columns, got {Q.shape}")
        rh = np.asarray(row_head)
        if rh.dtype.kind not in "iu" or rh.shape != (Q.shape[0],) or (rh.size and (rh.min() < 0 or rh.max() >= self.H)):
            raise ValueError(f"row_head must be {Q.shape[0]} KV-head ids in [0, {self.H})")
        if not isinstance(n_pages, (int, np.integer)) or n_pages < 1:
            raise ValueError(f"n_pages must be a positive int, got {n_pages!r}")
        n_live = int(self.alive[: self.n_tokens].sum())
        qp = query_projection(Q, self.u)  # the tree's projections are of the keys as kept
        out_pages = np.empty((1, Q.shape[0], int(n_pages)), np.int32)
        out_scores = np.empty((1, Q.shape[0], int(n_pages)), np.float32)
        # the batch kernel over a batch of one: one parallel search entry point to compile per key type
        search_batch(self._state_list(), np.zeros(1, np.int64),
                     self.scaled_queries(np.ascontiguousarray(Q), rh)[None], qp[None],
                     rh.astype(np.int32), self.top_level()[None], int(n_pages),
                     np.array([params.fov_for(n_live)], np.int64), float(params.prop_to_retrieve),
                     int(params.num_to_retrieve), self.cfg.faithful_proj_scale,
                     np.array([max(self.n_tokens, 1)], np.int64), out_pages, out_scores)
        return out_pages[0], out_scores[0]

    def _state_list(self) -> List:
        """A numba typed list holding this index's state tuple (what :func:`search_batch` reads), made once:
        filling a typed list unboxes every array (see :class:`StateList`). Dropped wherever the state arrays
        are replaced (``_alloc``, ``_grow``) and in a ``copy()``, which has arrays of its own."""
        if self._state_list_cache is None:
            self._state_list_cache = List()
            self._state_list_cache.append(self.state)
        return self._state_list_cache

    def query(self, queries, n_pages: int, params: QueryParams | None = None, merge: str = "rank") -> np.ndarray:
        """Top-``n_pages`` pages per KV head for ``queries [Hq, d]`` (GQA: ``Hq = group * H``, query
        head ``i`` belongs to KV head ``i // group``); the query heads' pages merged by ``merge``
        (``"rank"``: rank-interleaved, first P unique; ``"mass"``: :mod:`.gqa_merge`)."""
        Q = _as_float_array("queries", queries, 2)
        if Q.shape[0] % self.H != 0:
            raise ValueError(f"queries must have a multiple of num_heads={self.H} rows, got {Q.shape[0]}")
        group = Q.shape[0] // self.H
        rows, scores = self.query_rows(Q, np.repeat(np.arange(self.H), group), n_pages, params)
        return merge_rows(rows, scores, group, int(n_pages), merge, 1.0 / math.sqrt(self.d))

    # ------------------------------------------------------------------ page table views
    def page_tokens(self, h: int, pages) -> list[np.ndarray]:
        """Token ids in each page, in slot order."""
        pages = np.asarray(pages)
        return [self.page_tok[h, p, : self.page_fill[h, p]].astype(np.int64) for p in pages if p >= 0]

    def page_fill_of(self, h: int, pages) -> np.ndarray:
        return self.page_fill[h, np.asarray(pages)]

    def pages_to_positions(self, h: int, pages) -> np.ndarray:
        """Caller positions of all tokens in ``pages`` (concatenated)."""
        toks = self.page_tokens(h, pages)
        return self.positions[np.concatenate(toks)] if toks else np.empty(0, np.int64)

    def page_positions(self, pages: np.ndarray) -> np.ndarray:
        """Caller positions of the tokens of ``pages [H, P]`` in slot order -> ``[H, P, C]`` (-1 padded, also
        for page -1)."""
        pg = np.maximum(pages, 0)
        heads = np.arange(pages.shape[0])[:, None]
        tok = self.page_tok[heads, pg]
        valid = (np.arange(self.C) < self.page_fill[heads, pg][..., None]) & (pages[..., None] >= 0)
        return np.where(valid, self.positions[np.maximum(tok, 0)], -1)

    def dirty_pages(self, clear: bool = True) -> list[np.ndarray]:
        """Per head the page ids whose tokens or order changed (or that were allocated or freed) since the last
        ``clear`` (``page_version`` against a snapshot; the index's own versions are never reset)."""
        v = self.page_version
        seen = getattr(self, "_versions_clean", None)
        if seen is None:
            seen = np.zeros_like(v)
        elif seen.shape != v.shape:  # capacity changed: pages past the snapshot were clean at version 0
            grown = np.zeros_like(v)
            k = min(v.shape[1], seen.shape[1])
            grown[:, :k] = seen[:, :k]
            seen = grown
        out = [np.flatnonzero(v[h] != seen[h]) for h in range(self.H)]
        if clear:
            self._versions_clean = v.copy()
        return out

    def live_pages(self, h: int) -> np.ndarray:
        return np.flatnonzero(self.page_cell[h, : self.next_page[h]] >= 0)

    def stats(self) -> dict:
        return {
            "tokens": int(self.alive[: self.n_tokens].sum()),
            "levels": [int(x) for x in self.top_level() + 1],
            "pages": [int(self.live_pages(h).size) for h in range(self.H)],
            "M": [float(x) for x in self.M],
        }

    def check_invariants(self) -> None:
        """Recompute the tree and page invariants (index-spec T6/T7); AssertionError on a violation."""
        from .invariants import check_invariants

        check_invariants(self)


class StateList:
    """A numba typed list holding the state tuples of many indexes, for :func:`query_batch`.

    Putting a state tuple into a typed list unboxes its arrays, which costs about as much as searching a
    small index, so each index keeps its slot and is re-put only when its arrays were replaced
    (``storage_version``). ``drop`` frees the slot (and the list's reference to the arrays). ``positions``
    holds each index's ``positions`` at the same slot (replaced with the state arrays; the exact scan of
    ``scan_batch.py`` writes the chosen tokens' positions).
    """

    def __init__(self):
        self.states = List()
        self.positions = List()
        self._slot: dict[int, list] = {}  # id(index) -> [slot, storage_version, index]
        self._free: list[int] = []
        self._empty = None

    def slot(self, idx: PagedDCIIndex) -> int:
        entry = self._slot.get(id(idx))
        if entry is None or entry[2] is not idx:
            entry = [self._free.pop() if self._free else len(self.states), -1, idx]
            if entry[0] == len(self.states):
                self.states.append(idx.state)
                self.positions.append(idx.positions)
                entry[1] = idx.storage_version
            self._slot[id(idx)] = entry
        if entry[1] != idx.storage_version:
            self.states[entry[0]] = idx.state
            self.positions[entry[0]] = idx.positions
            entry[1] = idx.storage_version
        return entry[0]

    def drop(self, idx: PagedDCIIndex) -> None:
        entry = self._slot.pop(id(idx), None)
        if entry is None:
            return
        if self._empty is None:
            empty = PagedDCIIndex(idx.H, idx.d, idx.dv, idx.cfg)
            self._empty, self._empty_positions = empty.state, empty.positions
        self.states[entry[0]] = self._empty  # release the arrays
        self.positions[entry[0]] = self._empty_positions
        self._free.append(entry[0])

    def __len__(self) -> int:
        return len(self._slot)


def query_batch(indexes: list[PagedDCIIndex], queries, n_pages: int, params: QueryParams | None = None,
                states: StateList | None = None, merge: str = "rank") -> np.ndarray:
    """``PagedDCIIndex.query`` for B indexes of one shape and configuration at once -> ``[B, H, P]``.
    ``queries [B, Hq, d]``: row b queries ``indexes[b]``, which must hold at least one token. The same
    result as B separate queries, with every (index, KV head) pair searched in parallel. Pass a long-lived
    ``states`` to skip re-unboxing unchanged indexes."""
    params = params or QueryParams()
    Q = np.ascontiguousarray(_as_float_array("queries", queries, 3))
    if not indexes or Q.shape[0] != len(indexes):
        raise ValueError(f"queries must have one row block per index: {Q.shape[0]} vs {len(indexes)} indexes")
    first = indexes[0]
    H, d = first.H, first.d
    n_live = [idx.n_live for idx in indexes]
    for idx, n in zip(indexes, n_live):
        if (idx.H, idx.d, idx.dv, idx.cfg) != (H, d, first.dv, first.cfg) or n == 0:
            raise ValueError("query_batch needs non-empty indexes of one shape and configuration")
    if Q.shape[2] != d or Q.shape[1] % H:
        raise ValueError(f"queries must have shape [B, a multiple of {H}, {d}], got {list(Q.shape)}")
    if not isinstance(n_pages, (int, np.integer)) or n_pages < 1:
        raise ValueError(f"n_pages must be a positive int, got {n_pages!r}")
    B, group, P = len(indexes), Q.shape[1] // H, int(n_pages)
    states = states if states is not None else StateList()
    which = np.array([states.slot(idx) for idx in indexes], np.int64)
    qp = query_projection(Q.reshape(-1, d), first.u).reshape(B, -1)  # one seed: one projection for all
    if first._channel_scaled:  # scores of stored rows (keys / key_scale) against queries * key_scale
        heads = np.repeat(np.arange(H), group)
        Q = np.ascontiguousarray(np.stack([idx.scaled_queries(Q[b], heads) for b, idx in enumerate(indexes)]))
    rows = np.empty((B, Q.shape[1], P), np.int32)
    scores = np.empty((B, Q.shape[1], P), np.float32)
    search_batch(states.states, which, Q, qp, np.repeat(np.arange(H), group).astype(np.int32),
                 np.stack([idx.top_level() for idx in indexes]),
                 P, np.array([params.fov_for(n) for n in n_live], np.int64),
                 float(params.prop_to_retrieve), int(params.num_to_retrieve), first.cfg.faithful_proj_scale,
                 np.array([max(idx.n_tokens, 1) for idx in indexes], np.int64), rows, scores)
    return np.stack([merge_rows(rows[b], scores[b], group, P, merge, 1.0 / math.sqrt(d)) for b in range(B)])


def _each_head(fn, H: int, madds: float) -> None:
    """``fn(h)`` for every head; side by side on the calling thread's share of numba threads when one head's
    parent search is at least ``PARALLEL_PARENTS_MIN`` multiply-adds. ``fn`` runs NumPy and BLAS only, which
    release the GIL (the indexer runs BLAS on one thread: otherwise one core idles through a build's
    parents); a numba parallel kernel in it would start from a thread without the caller's thread count."""
    k = min(H, numba.get_num_threads()) if madds >= PARALLEL_PARENTS_MIN else 1
    if k > 1:
        with ThreadPoolExecutor(k, thread_name_prefix="icecache-parents") as pool:
            list(pool.map(fn, range(H)))
    else:
        for h in range(H):
            fn(h)


# ---------------------------------------------------------------------- numba drivers


@njit(cache=True, nogil=True, parallel=True)
def _cell_orders(parent, proj, n_ids):
    """Per head, the local indices ``0 .. n-1`` sorted by cell (``parent + 1``, in ``[0, n_ids]``), then by
    ``proj``, then by index (``np.lexsort((tids, proj, cells))`` for ascending token ids ``tids``: a stable
    counting sort by cell, then each cell's run sorted stably by projection) -> (``orders``, the cells in
    that order), int32 ``[H, n]``, heads in parallel. (Sorting every token by projection first and then
    counting them into cells took twice as long: a cell holds ~100 tokens.)"""
    H, n = proj.shape
    orders = np.empty((H, n), np.int32)
    cells_sorted = np.empty((H, n), np.int32)
    for h in prange(H):
        start = np.zeros(n_ids + 2, np.int64)
        for i in range(n):
            start[parent[h, i] + 2] += 1
        for c in range(1, n_ids + 2):
            start[c] += start[c - 1]
        for i in range(n):
            c = parent[h, i] + 1
            orders[h, start[c]] = i
            cells_sorted[h, start[c]] = c
            start[c] += 1
        keys = np.empty(n, np.float64)
        scratch = np.empty(n, np.int32)
        a = 0
        while a < n:
            b = a + 1
            while b < n and cells_sorted[h, b] == cells_sorted[h, a]:
                b += 1
            for k in range(a, b):
                keys[k - a] = proj[h, orders[h, k]]
            sort_by(keys, orders[h], a, b - a, scratch)
            a = b
    return orders, cells_sorted


@njit(cache=True, nogil=True)
def _build_head(S, h, tids, order, cells_sorted, K, V, level, parent, proj, sqn, m, bisect):
    """Lay out one head's cells; ``order`` sorts the local indices by cell, then in page order: (projection,
    token id), or each cell's bisection order (``layout.bisect_cells``), where a child's page key is its
    rank."""
    tok_level, tok_parent, tok_proj, tok_sqn, tok_pkey = S[0], S[1], S[4], S[5], S[24]
    cell_m, cnt_desc, cnt_pages, tok_cell = S[9], S[10], S[11], S[26]
    n = K.shape[0]
    for i in range(n):
        t = tids[i]
        tok_level[h, t] = level[i]
        tok_parent[h, t] = parent[i]
        tok_proj[h, t] = proj[i]
        tok_pkey[h, t] = proj[i]
        tok_sqn[h, t] = sqn[i]
        if tok_cell[h, t + 1] >= 0:  # above level 0 (a level-0 token counts itself: ``subtree_tokens``)
            cnt_desc[h, tok_cell[h, t + 1]] = 1
    i = 0
    while i < n:
        c = cells_sorted[i]
        j = i
        while j < n and cells_sorted[j] == c:
            j += 1
        seg = order[i:j]
        if bisect:
            for r in range(j - i):
                tok_pkey[h, tids[seg[r]]] = r
        cs = tok_cell[h, c]
        cnt_pages[h, cs] += pt.layout_sorted(S, h, np.int64(c), tids[seg], K[seg], V[seg])
        cell_m[h, cs] = m
        i = j
    by_level = np.argsort(level, kind="mergesort")
    for k in range(n):
        i = by_level[k]
        t = tids[i]
        pc = tok_cell[h, parent[i] + 1]
        cnt_desc[h, pc] += pt.subtree_tokens(S, h, t + 1)
        cnt_pages[h, pc] += pt.subtree_pages(S, h, t + 1)


@njit(cache=True, nogil=True, parallel=True)
def _build_heads(S, tids, orders, cells_sorted, K, V, level, parent, proj, sqn, m, bisect):
    """:func:`_build_head` for every head, in parallel over heads."""
    for hh in prange(K.shape[0]):
        h = np.int64(hh)  # prange's index is unsigned: one head type for every caller (one compile, not two)
        _build_head(S, h, tids, orders[h], cells_sorted[h], K[h], V[h], level, parent[h], proj[h], sqn[h], m[h],
                    bisect)


@njit(cache=True, nogil=True, parallel=True)
def _insert_heads(S, tids, parents, K, V, M, u0, bisect):
    """Attach each head's new tokens (projected with ``M [H]``, float32) under their parents, heads in parallel."""
    for hh in prange(K.shape[0]):
        h = np.int64(hh)
        for i in range(tids.shape[0]):
            pt.attach(S, h, np.int64(tids[i]), np.int64(parents[h, i]), K[h, i], V[h, i], M[h], u0, bisect)  # as _move's


__all__ = ["IndexConfig", "PagedDCIIndex", "QueryParams", "StateList", "query_batch"]
