"""Token re-ranking (``runtime/rerank.py``): the budget's best candidate tokens by the step's own queries, as a
float64 reference ranks them; invalid candidates last; a KV head without candidates keeps none. The kept tokens
written into a compact plan's rows where they were ranked (``plan.ReRanked``); on a GPU (``benchmarks/gpu/run.sh
--tests``) without one synchronising operation."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from icecache_sglang.runtime.rerank import rerank_tokens, rerank_tokens_reference


def test_rerank_keeps_the_tokens_a_reference_ranks_best():
    g = torch.Generator().manual_seed(0)
    S, Hq, H, d, slots, W = 3, 8, 2, 16, 400, 48
    q = torch.randn(S, Hq, d, generator=g)
    keys = torch.randn(slots, H, d, generator=g)
    cand = torch.stack([torch.stack([torch.randperm(slots, generator=g)[:W] for _ in range(H)]) for _ in range(S)])
    cand[0, 1, 30:] = -1  # fewer valid candidates than kept
    cand[1, 0, ::3] = -1  # holes
    cand[2, 1, :] = -1  # none at all
    got = rerank_tokens(q, keys, cand, keep=20, scale=0.25)
    want = rerank_tokens_reference(q, keys, cand, keep=20, scale=0.25)
    assert got.shape == (S, H, 20)
    for s in range(S):
        for h in range(H):  # the same set (ties between float32 and float64 sums aside: none here)
            assert sorted(got[s, h][got[s, h] >= 0].tolist()) == sorted(want[s, h][want[s, h] >= 0].tolist()), (s, h)
    assert (got[0, 1] >= 0).sum() == 20 and (got[2, 1] == -1).all()
    # valid slots first, so a plan's valid mask counts min(keep, valid candidates)
    valid = (got >= 0).numpy()
    assert all(np.all(np.diff(valid[s, h].astype(int)) <= 0) for s in range(S) for h in range(H))


def test_a_large_batch_is_ranked_in_chunks_with_the_same_result(monkeypatch):
    import icecache_sglang.runtime.rerank as rr

    g = torch.Generator().manual_seed(2)
    q, keys = torch.randn(7, 4, 8, generator=g), torch.randn(300, 2, 8, generator=g)
    cand = torch.stack([torch.stack([torch.randperm(300, generator=g)[:40] for _ in range(2)]) for _ in range(7)])
    whole = rerank_tokens(q, keys, cand, keep=10, scale=0.3)
    monkeypatch.setattr(rr, "CHUNK_BYTES", 2 * 40 * 8 * 4 * 2)  # two requests per chunk
    assert torch.equal(rerank_tokens(q, keys, cand, keep=10, scale=0.3), whole)


def test_keeping_every_candidate_changes_nothing_but_the_order():
    g = torch.Generator().manual_seed(1)
    q, keys = torch.randn(2, 4, 8, generator=g), torch.randn(100, 2, 8, generator=g)
    cand = torch.randint(0, 100, (2, 2, 12), generator=g)
    got = rerank_tokens(q, keys, cand, keep=12, scale=0.3)
    assert torch.equal(got.sort(-1).values, cand.sort(-1).values)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@contextlib.contextmanager
def no_sync(device: str):
    """On a GPU, any operation inside that waits for the device raises (torch's sync debug mode)."""
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", DEVICES)
def test_reranked_tokens_fill_their_rows_where_they_were_ranked(device):
    """``ReRanked.fill`` over a compact layout of three requests (sparse, dense, sparse; heads keeping different
    counts, one keeping none) writes each kept token where laying the kept tokens out on the host puts it; the
    ranking and the fill run on ``device`` without waiting for it."""
    from icecache_sglang.runtime.plan import ReRanked, compact_layout

    g = torch.Generator().manual_seed(7)
    H, W, slots, d = 3, 5, 2000, 8
    fixed = [(np.arange(4), np.arange(100, 103)), (np.arange(200, 230), np.empty(0, np.int64)),
             (np.arange(300, 302), np.arange(400, 406))]
    cand = torch.stack([torch.stack([torch.randperm(slots - 1000, generator=g)[:2 * W] + 1000 for _ in range(H)])
                        for _ in range(2)])
    cand[0, 1, 2:] = -1  # two valid: keeps 2
    cand[0, 2, :] = -1  # none: keeps none
    cand[1, 2, 1:] = -1  # keeps 1
    q, keys = torch.randn(2, 2 * H, d, generator=g), torch.randn(slots, H, d, generator=g)
    counts = np.minimum((cand >= 0).sum(-1).numpy(), W)
    take = np.arange(W)[None, None, :] < counts[..., None]
    order = [0, 2]
    with no_sync(device):
        kept = rerank_tokens(q.to(device), keys.to(device), cand.to(device), W, 0.3)
    want = compact_layout(fixed, {b: kept[j].cpu().numpy() for j, b in enumerate(order)}, H, {})
    rr = ReRanked(order, kept, counts, take, {b: np.where(take[j], 0, -1) for j, b in enumerate(order)})
    tokens, indptr, rows = compact_layout(fixed, rr.placeholders, H, {})
    rows = torch.from_numpy(rows).to(device)
    with no_sync(device):
        rr.fill(rows, indptr, fixed, H)
    assert np.array_equal(tokens, want[0]) and np.array_equal(indptr, want[1])
    assert np.array_equal(rows.cpu().numpy(), want[2])
