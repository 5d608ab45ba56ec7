# First, before anything imports Triton (SGLang does): on a machine without CUDA this sets TRITON_INTERPRET,
# which Triton reads when its own library functions (tl.cumsum, ...) are defined, not only ours.
import icecache_sglang.kernels  # noqa: F401, I001

import sys

import numpy as np
import pytest

from icecache_sglang.index.keys import from_storage
from icecache_sglang.index.paged_index import PagedDCIIndex


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def int_keys(rng, shape, lo=-3, hi=3):
    """Small-integer vectors: every dot product is exact in float32 whatever the summation order,
    so the numba path and the NumPy reference can be compared for exact equality, ties included."""
    return rng.integers(lo, hi + 1, size=shape).astype(np.float32)


def oracle_pages(idx: PagedDCIIndex, h: int, q: np.ndarray, P: int) -> list[int]:
    """Live pages of head h ranked by exact max score (ties: smaller best-token id), top P."""
    ranked = []
    for p in idx.live_pages(h):
        toks = idx.page_tok[h, p, : idx.page_fill[h, p]]
        s = from_storage(idx.page_keys[h, p, : len(toks)]).astype(np.float64) @ q.astype(np.float64)
        best = s.max()
        ranked.append((-best, int(toks[s == best].min()), int(p)))
    ranked.sort()
    return [p for _, _, p in ranked[:P]]


EXHAUSTIVE = dict(fov=10**9, prop_to_retrieve=1.0)


def pytest_sessionfinish(session, exitstatus):
    servers = sys.modules.get("sglang_servers")  # the servers modules shared (tests/sglang_servers.py)
    if servers is not None:
        servers.stop_shared()
