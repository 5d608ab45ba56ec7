"""--enable-icecache with SGLang's paged allocator (--page-size 16) and no radix cache: when a request
finishes, SGLang frees its pages (PagedTokenToKVPoolAllocator._release_page_ids) and the index the request
left behind is released with them, with no flush_cache."""

from __future__ import annotations

import random

import pytest
from sglang_servers import TINY_ICE, icecache_args, server_fixture

from icecache_sglang.models.tiny import ensure_tiny_model

pytestmark = pytest.mark.slow

paged = server_fixture("tiny_ice_paged_noradix", ensure_tiny_model,
                       icecache_args(TINY_ICE, "--page-size", "16", "--disable-radix-cache"))


def test_finished_requests_leave_no_index_when_their_pages_are_freed(paged):
    rng = random.Random(5)
    for n in (700, 1500):
        r = paged.generate(input_ids=rng.choices(range(100, 40000), k=n), max_new_tokens=10)
        assert r["meta_info"]["completion_tokens"] == 10
    st = paged.icecache_stats()
    assert st["sparse_rows"] >= 18 and st["fallbacks"] == 0
    assert st["indexed_tokens"] > 2000
    assert st["tracker"] == {"live": 0, "retained": 0, "retained_tokens": 0, "slots_referenced": 0}
    assert st["indexer"]["sequences"] == 0 and st["indexer"]["tokens"] == 0
