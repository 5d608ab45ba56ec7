"""Recomputed checks of the tree and page invariants (index-spec T6, T7), used by tests and debugging."""

from __future__ import annotations

import numpy as np

from .keys import kept_keys
from .transform import key_projection, kk_distance


def _fail(h: int, msg: str) -> None:
    raise AssertionError(f"head {h}: {msg}")


def check_invariants(idx, exact_parents: bool = True, reference_keys: np.ndarray | None = None) -> None:
    """Raise AssertionError naming the first violated invariant.

    exact_parents: also check that every parent is the exact ``D_kk`` argmin one level up (holds
    while the max norm has not grown since the parents were chosen).
    reference_keys: ``[H, n_tokens, d]`` original keys; physical page rows must equal them.
    """
    n = idx.n_tokens
    live = np.flatnonzero(idx.alive[:n])
    live_set = set(live.tolist())
    C = idx.C
    for h in range(idx.H):
        level = idx.tok_level[h]
        parent = idx.tok_parent[h]
        top = int(level[live].max()) if live.size else -1
        # --- tree (T6)
        for t in live:
            p = parent[t]
            if p == -1:
                if level[t] != top:
                    _fail(h, f"token {t} (level {level[t]}) is a root child but the top level is {top}")
            elif p not in live_set:
                _fail(h, f"token {t} has dead or missing parent {p}")
            elif level[p] != level[t] + 1:
                _fail(h, f"token {t} on level {level[t]} has parent {p} on level {level[p]}")
        counts = np.bincount(level[live], minlength=64) if live.size else np.zeros(64, int)
        if not np.array_equal(counts[:64], idx.level_counts[h]):
            _fail(h, f"level counts {idx.level_counts[h][:8]} != recomputed {counts[:8]}")
        # --- cell slots: the root's is 0, a live token above level 0 has its own, no other token has one
        slots = idx.tok_cell[h, : n + 1]
        if slots[0] != 0:
            _fail(h, f"the root's cell slot is {slots[0]}")
        has = np.zeros(n + 1, bool)
        has[live + 1] = level[live] >= 1
        has[0] = True
        if np.any((slots >= 0) != has):
            c = int(np.flatnonzero((slots >= 0) != has)[0])
            _fail(h, f"cell {c} has slot {slots[c]} (a slot belongs to the root and live tokens above level 0)")
        used = slots[has]
        free = idx.free_slots[h, : idx.n_free_slots[h]]
        handed = int(idx.next_slot[h])
        if np.unique(used).size != used.size or used.max() >= handed:
            _fail(h, "cell slots shared by two cells, or past the slots handed out")
        if np.unique(free).size != free.size or np.intersect1d(used, free).size or (free.size and (
                free.min() < 1 or free.max() >= handed)):
            _fail(h, "the free cell slots repeat, are in use, or are not slots handed out")
        if used.size + free.size != handed:
            _fail(h, f"{handed - used.size - free.size} cell slots neither used nor free (leaked)")
        if np.any(idx.tok_cell[h, n + 1:] != -1):
            _fail(h, "a token id not handed out has a cell slot")
        cell_first, cell_last = idx.cell_array("cell_first", h), idx.cell_array("cell_last", h)
        cell_nchild, cell_m = idx.cell_array("cell_nchild", h), idx.cell_array("cell_m", h)
        # --- pages (T7)
        seen_tok: dict[int, tuple[int, int]] = {}
        live_pages = set()
        for cell in [0] + [int(t) + 1 for t in live]:
            p = cell_first[cell]
            prev = -1
            keys_in_order = []
            while p >= 0:
                if p in live_pages:
                    _fail(h, f"page {p} linked twice")
                live_pages.add(p)
                if idx.page_cell[h, p] != cell:
                    _fail(h, f"page {p} in cell {cell}'s list belongs to cell {idx.page_cell[h, p]}")
                if idx.page_prev[h, p] != prev:
                    _fail(h, f"page {p} has prev {idx.page_prev[h, p]}, expected {prev}")
                f = idx.page_fill[h, p]
                if not (1 <= f <= C):
                    _fail(h, f"page {p} has fill {f} outside [1, {C}]")
                for j in range(f):
                    t = int(idx.page_tok[h, p, j])
                    if t in seen_tok:
                        _fail(h, f"token {t} appears in two slots")
                    seen_tok[t] = (p, j)
                    if idx.tok_page[h, t] != p or idx.tok_slot[h, t] != j:
                        _fail(h, f"token {t} maps to ({idx.tok_page[h, t]}, {idx.tok_slot[h, t]}), lives in ({p}, {j})")
                    if parent[t] + 1 != cell:
                        _fail(h, f"token {t} sits in cell {cell} but its parent is {parent[t]}")
                    keys_in_order.append((idx.tok_pkey[h, t], t))
                    if idx.page_proj[h, p, j] != idx.tok_proj[h, t]:
                        _fail(h, f"page_proj of token {t} differs from tok_proj")
                    if idx.cfg.layout == "projection" and idx.tok_pkey[h, t] != idx.tok_proj[h, t]:
                        _fail(h, f"token {t}'s page key differs from its projection (projection layout)")
                    if cell_m[cell] < idx.tok_sqn[h, t]:
                        _fail(h, f"token {t}'s squared norm exceeds its cell's m {cell_m[cell]}")
                prev = p
                p = idx.page_next[h, p]
            if cell_last[cell] != prev:
                _fail(h, f"cell {cell} last page {cell_last[cell]} != {prev}")
            if keys_in_order != sorted(keys_in_order):
                _fail(h, f"cell {cell}'s pages are not in page-key order")
            if cell_nchild[cell] != len(keys_in_order):
                _fail(h, f"cell {cell} child count {cell_nchild[cell]} != {len(keys_in_order)}")
        if set(seen_tok) != live_set:
            _fail(h, f"pages hold {len(seen_tok)} tokens, {live.size} are live")
        free = idx.free_stack[h, : idx.free_n[h]].tolist()
        if len(set(free)) != len(free) or set(free) & live_pages:
            _fail(h, "free list has duplicates or live pages")
        if set(free) | live_pages != set(range(idx.next_page[h])):
            _fail(h, "some page id is neither live nor free")
        if any(idx.page_cell[h, p] != -1 for p in free):
            _fail(h, "a free page still names a cell")
        # --- projections and physical rows
        if live.size:
            keys = idx._key(h, live)  # as kept (an int8 row times its channel scales)
            if reference_keys is not None and not np.array_equal(
                    keys, kept_keys(reference_keys[h, live][None].astype(np.float32), idx.cfg.storage_dtype,
                                    idx.key_scale[h][None])[0]):
                _fail(h, "physical page rows differ from the tokens' keys")
            sqn = np.einsum("nd,nd->n", keys.astype(np.float64), keys.astype(np.float64))
            # the tree's numbers are float32 (``pagetable.TREE_FLOAT``): a norm within two of its ulps, a
            # projection within its own rounding (|projection| <= sqrt(M); a lift recomputes it from the key)
            if not np.allclose(sqn, idx.tok_sqn[h, live], rtol=2.5e-7, atol=1e-30):
                _fail(h, "stored squared norms differ from the page rows")
            # a token is projected with its cell's m
            want = key_projection(keys, idx.tok_sqn[h, live].astype(np.float64),
                                  cell_m[idx.tok_parent[h, live] + 1].astype(np.float64), idx.u)
            scale = np.sqrt(max(idx.M[h], 1e-30))
            if not np.allclose(want, idx.tok_proj[h, live], rtol=0, atol=1e-7 * scale):
                _fail(h, "stored projections differ from the keys' projections")
            if np.any(idx.tok_sqn[h, live] > idx.M[h]):
                _fail(h, "a key's squared norm exceeds M")
        # --- counters
        desc = np.zeros(n + 1, np.int64)
        pages = np.zeros(n + 1, np.int64)
        for p in live_pages:
            pages[idx.page_cell[h, p]] += 1
        desc[live + 1] = 1
        for t in sorted(live.tolist(), key=lambda t: level[t]):
            desc[parent[t] + 1] += desc[t + 1]
            pages[parent[t] + 1] += pages[t + 1]
        cells = np.concatenate([[0], live + 1])
        if not np.array_equal(desc[cells], idx.cell_array("cnt_desc", h)[cells]):
            _fail(h, "subtree token counters differ from recomputed values")
        if not np.array_equal(pages[cells], idx.cell_array("cnt_pages", h)[cells]):
            _fail(h, "subtree page counters differ from recomputed values")
        # --- exact parents
        if exact_parents and live.size:
            for lv in range(top):
                kids = live[level[live] == lv]
                ups = live[level[live] == lv + 1]
                if kids.size == 0:
                    continue
                kk, uk = idx._key(h, kids), idx._key(h, ups)
                D = kk_distance(kk, uk, idx.M[h])
                pos = {int(t): i for i, t in enumerate(ups)}
                chosen = D[np.arange(kids.size), [pos[int(parent[t])] for t in kids]]
                if lv == 0 and idx.run_starts.size:  # built in runs: the nearest of the parent's run's tokens
                    # (a token inserted since, or moved by a delete, has the nearest of all: nearer still)
                    run_of = np.searchsorted(idx.run_starts, ups, side="right")
                    parent_run = run_of[[pos[int(parent[t])] for t in kids]]
                    D = np.where(run_of[None, :] == parent_run[:, None], D, np.inf)
                tol = 1e-5 * max(idx.M[h], 1e-30)
                bad = np.flatnonzero(chosen > D.min(axis=1) + tol)
                if bad.size:
                    _fail(h, f"token {kids[bad[0]]}'s parent is not its D_kk argmin")
