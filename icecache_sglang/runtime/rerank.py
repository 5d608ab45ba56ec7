"""Token re-ranking (``token_rerank: m``): the indexer selects ``m`` times the budget's pages per KV head, and
each anchor layer attends to the budget's best tokens among theirs, ranked by the step's own query.

A page holds tokens the query does not need, and a selection reused from an earlier step (``step_reuse``,
``max_stale_steps``) was ranked by an older query. Both cost attention mass that the current query, which
the attention has at no cost, can win back among a few times more candidates: measured on Qwen2.5-Coder's
captured Q/K at a 256-token budget (``benchmarks/stale_selection.py``), a selection one step old keeps 0.936
of the synchronous selection's mass, re-ranked to the best tokens of 2x / 3x its pages 1.03 / 1.07 (more
than the synchronous pages themselves, at the same number of tokens).

A token's weight for its KV head is the sum over the head's query heads of its softmax probability among
the candidates (the ``mass`` GQA merge's estimate, token by token, whatever ``gqa_merge`` says; each head's
softmax runs over the candidates only, not over the sink and recent tokens it also attends). Candidates and
the tokens kept are KV slots; -1 pads both. The candidates' keys are scored in chunks of requests, so the
float32 scores of a large batch at a large budget stay within ``CHUNK_BYTES``.
"""

from __future__ import annotations

import torch

#: the most bytes of gathered float32 keys one chunk of requests may take (a GPU at a budget of thousands of
#: tokens and tens of requests would otherwise gather gigabytes per anchor layer)
CHUNK_BYTES = 256 * 2**20


def rerank_tokens(q: torch.Tensor, keys: torch.Tensor, cand: torch.Tensor, keep: int, scale: float) -> torch.Tensor:
    """The ``keep`` best candidate slots per (request, KV head), -1 where fewer are valid.

    ``q [S, H_q, d]``: the step's queries of the S requests; ``keys [slots, H, d]``: the layer's K plane;
    ``cand [S, H, W]`` (int64, -1 padded): candidate slots. Returns ``[S, H, min(keep, W)]`` int64 on
    ``cand``'s device, the valid slots first, best first."""
    S, H, W = cand.shape
    keep = min(keep, W)
    if S == 0 or W == 0:
        return cand[..., :keep]
    step = max(1, CHUNK_BYTES // max(1, H * W * keys.shape[-1] * 4))
    if S > step:
        return torch.cat([rerank_tokens(q[i:i + step], keys, cand[i:i + step], keep, scale) for i in range(0, S, step)])
    g = q.shape[1] // H
    valid = cand >= 0
    heads = torch.arange(H, device=cand.device)[None, :, None]
    k = keys[cand.clamp(min=0), heads].float()  # [S, H, W, d]
    qg = q.reshape(S, H, g, -1).float()  # query head i belongs to KV head i // g
    scores = torch.einsum("shgd,shwd->shgw", qg, k) * scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0).sum(dim=2)  # [S, H, W]; a head without candidates: 0
    w = w.masked_fill(~valid, -1.0)  # invalid candidates last
    idx = torch.topk(w, keep, dim=-1, sorted=True).indices
    return cand.gather(-1, idx)


def rerank_tokens_reference(q, keys, cand, keep: int, scale: float):
    """What :func:`rerank_tokens` computes, one (request, KV head) at a time in float64 NumPy (tests)."""
    import numpy as np

    q, keys, cand = (np.asarray(x.cpu()) for x in (q, keys, cand))
    S, H, W = cand.shape
    g = q.shape[1] // H
    keep = min(keep, W)
    out = np.full((S, H, keep), -1, np.int64)
    for s in range(S):
        for h in range(H):
            c = cand[s, h][cand[s, h] >= 0]
            if len(c) == 0:
                continue
            sc = q[s, h * g:(h + 1) * g].astype(np.float64) @ keys[c, h].astype(np.float64).T * scale
            p = np.exp(sc - sc.max(axis=1, keepdims=True))
            w = (p / p.sum(axis=1, keepdims=True)).sum(axis=0)
            best = c[np.argsort(-w, kind="stable")[:keep]]
            out[s, h, :len(best)] = best
    return out
