"""Baseline page selections the indexer serves beside IceCache's search (``Query.policy``).

Each answers over the same sequence's indexed tokens, in the same reply format (``pages [H_kv, P]``,
``slots [H_kv, P, C]``), so an accuracy run through the server changes one thing only: how pages are chosen
(evaluation.md). The positional baselines reuse the offline policies of ``index/selection``, so the server
and the index-quality benchmark rank pages the same way.

- ``oracle_page``: IceCache's own pages ranked by their exact best score (the best its search can do), by
  the tight scan of ``index/scan.py``: on CPU it costs about what the search does (``index_speed.py``).
  Over an int8 index (an approximate copy of the keys) the scan rescores its best candidates from the key
  store (``exact``), so the ranking stays exact (``benchmarks/int8_keys.py``);
- ``lowrank`` and ``lowrank_pages`` (searches, served here beside the scan they fall back to): the exact
  scan's ranking over the pages a query-aware low-rank first pass picks (``index/lowrank.py``), over every
  token's code or, with the page stage, over the tokens of the pages whose summaries rank best;
- ``oracle_positional``: fixed pages of C consecutive tokens, ranked by exact best score;
- ``quest``: the same pages ranked by Quest's per-page min/max bound;
- ``streaming``: the most recent indexed tokens (with the sink and unindexed tail the backend adds, that is
  StreamingLLM's sink + recent window at the same budget).

Positional order is the index's insertion order (tokens arrive in position order: a build over the prompt,
then the window's oldest tokens); page ids of positional baselines number those fixed pages, not index pages.
"""

from __future__ import annotations

import numpy as np

from ..index.keys import from_storage
from ..index.lowrank import PAGE_STAGE_FACTOR, scan_index_lowrank
from ..index.scan import scan_index
from ..index.paged_index import PagedDCIIndex
from ..index.selection import OraclePositionalPolicy, QuestPolicy

from .policies import BASELINES, POLICIES  # noqa: F401 - re-exported


def select_baseline(idx: PagedDCIIndex, q: np.ndarray, n_pages: int, policy: str,
                    merge: str = "rank", store: np.ndarray | None = None, layer: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``q [H_q, d]`` (query head ``i`` on KV head ``i // group``) -> ``pages [H, P]`` and ``slots [H, P, C]``
    (int32, -1 padded). ``merge``: the GQA merge of the page-ranking policies (``index/gqa_merge.py``);
    ``store [S, H, d]``: the layer's exact keys, the row of a token at its position (the key store), which
    an int8 index's exact scan rescores from; ``layer``: the index's model layer (``lowrank`` staggers its fit
    by it)."""
    known = BASELINES + ("exact", "lowrank", "lowrank_pages")
    if policy not in known:
        raise ValueError(f"unknown baseline {policy!r}; known: {list(known)}")
    H, C, P = idx.H, idx.C, n_pages
    pages = np.full((H, P), -1, np.int32)
    lowranks = ("lowrank", "lowrank_pages")
    if policy in lowranks and store is not None and store.dtype in (np.float32, np.uint16):
        pages = scan_index_lowrank(idx, np.ascontiguousarray(q, np.float32), P, store, merge=merge, layer=layer,
                                   page_stage=PAGE_STAGE_FACTOR if policy == "lowrank_pages" else 0)
        return pages, idx.page_positions(pages).astype(np.int32)
    if policy in lowranks:  # no exact keys to rescore from (a float16 store): the exact scan
        policy = "exact"
    if policy in ("oracle_page", "exact"):  # the tight exhaustive scan (index/scan.py): every key read once per KV head
        if idx.page_keys.dtype == np.int8 and store is None:
            raise ValueError("an int8 index's exact scan needs the key store to rescore from")
        pages = scan_index(idx, np.ascontiguousarray(q, np.float32), P, merge=merge,
                           store=store if idx.page_keys.dtype == np.int8 else None)
        return pages, idx.page_positions(pages).astype(np.int32)
    slots = np.full((H, P, C), -1, np.int32)
    ids = idx.live_ids()
    n = ids.size
    if n == 0:
        return pages, slots
    pos = idx.positions[ids]
    if policy == "streaming":  # the last P*C tokens, as P rows of C from the oldest
        start = max(0, n - P * C)
        for j, a in enumerate(range(start, n, C)):
            chunk = pos[a: min(a + C, n)]
            pages[:, j] = a // C
            slots[:, j, : chunk.size] = chunk
        return pages, slots
    chooser = (OraclePositionalPolicy(C) if policy == "oracle_positional" else QuestPolicy(C)).set_merge(merge)
    if store is not None:  # the exact keys (an int8 index keeps an approximate copy)
        keys = np.ascontiguousarray(from_storage(store[pos]).transpose(1, 0, 2))
    else:
        keys = idx.keys_of(ids)
    chooser.build(keys)
    for h, chosen in enumerate(chooser.select(np.ascontiguousarray(q, np.float32), P * C)):
        for j, pg in enumerate(np.unique(chosen // C)[:P]):
            toks = chosen[chosen // C == pg]
            pages[h, j] = pg
            slots[h, j, : toks.size] = pos[toks]
    return pages, slots
