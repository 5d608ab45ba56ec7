"""The per-case selection metrics (icecache_sglang/index/metrics.py) on tiny hand-made inputs with known
answers, plus one check against a real index: an exhaustive search finds every query head's best page."""

import numpy as np
import pytest
from conftest import EXHAUSTIVE

from icecache_sglang.index.config import IndexConfig, QueryParams
from icecache_sglang.index.metrics import (attention_probs, best_pages, mass_recall, mass_recall_per_head,
                                           page_max_scores, pages_covering, ratio_percentile, row_top_page_hits,
                                           tokens_attended, tokens_per_head, top_logit_gap, top_page_hits,
                                           top_page_recall, top_token_hits)
from icecache_sglang.index.paged_index import PagedDCIIndex

PROBS = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])


def test_mass_recall_per_head_follows_the_group_of_each_query_head():
    # one KV head, two query heads on it: both see the KV head's selection
    assert mass_recall_per_head(PROBS, [np.array([0, 2])]) == pytest.approx([0.7, 1.0 - 0.1])
    assert mass_recall(PROBS, [np.array([0, 2])]) == pytest.approx(0.8)
    # two KV heads, one query head each: head 1 sees only its own selection
    assert mass_recall_per_head(PROBS, [np.array([0]), np.array([2])]) == pytest.approx([0.5, 0.8])
    assert mass_recall_per_head(PROBS, [np.array([], np.int64)] * 2) == pytest.approx([0.0, 0.0])
    # two KV heads, two query heads each: query heads 0, 1 on KV head 0 and 2, 3 on KV head 1
    p4 = np.vstack([PROBS, PROBS])
    assert mass_recall_per_head(p4, [np.array([0]), np.array([2])]) == pytest.approx([0.5, 0.1, 0.2, 0.8])


def test_tokens_attended_counts_distinct_positions_per_kv_head():
    sel = [np.array([0, 1, 1, 5]), np.array([3])]
    assert tokens_per_head(sel).tolist() == [3, 1]
    assert tokens_attended(sel) == 2.0
    assert tokens_attended([np.arange(16), np.arange(7)]) == 11.5  # a full and a partly filled page
    assert tokens_attended([]) == 0.0


def test_page_max_scores_takes_the_max_over_real_tokens_only():
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, -1.0]])
    pages = np.array([[0, 1], [2, -1], [3, -1], [-1, -1]])
    q = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    s = page_max_scores(q, keys, pages)
    assert s.shape == (3, 4)
    assert s[0, :3].tolist() == [1.0, 2.0, 0.0]
    assert s[1, :3].tolist() == [1.0, 0.0, -1.0]
    # padding reads no key: page 1 holds only token 2 (score -2); token 0 (score -1) must not leak in
    assert s[2, :3].tolist() == [0.0, -2.0, 0.0]
    assert np.all(np.isneginf(s[:, 3]))  # a page without tokens
    with pytest.raises(ValueError):
        page_max_scores(q, keys, np.array([0, 1]))


def test_best_pages_returns_page_ids_per_query_head():
    # KV head 0: pages 7 = {0, 1}, 3 = {2}; KV head 1: pages 9 = {0}, 4 = {1, 2}. Two query heads per KV head.
    keys = np.array([[[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]],
                     [[0.0, 2.0], [1.0, 0.0], [0.0, -5.0]]])
    ids = [np.array([7, 3]), np.array([9, 4])]
    pos = [np.array([[0, 1], [2, -1]]), np.array([[0, -1], [1, 2]])]
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    pages, scores = best_pages(q, keys, ids, pos)
    assert pages.tolist() == [3, 7, 4, 9]
    assert scores.tolist() == [3.0, 1.0, 1.0, 2.0]
    # ties go to the page listed first
    tied, _ = best_pages(np.array([[1.0, 0.0]]), np.array([[[1.0, 0.0], [1.0, 0.0]]]),
                         [np.array([5, 2])], [np.array([[0], [1]])])
    assert tied.tolist() == [5]


def test_top_page_hits_use_the_kv_heads_merged_set_and_rows_their_own_list():
    best = np.array([7, 3, 9, 9])  # query heads 0, 1 on KV head 0; 2, 3 on KV head 1
    merged = [np.array([3, 7, -1]), np.array([5])]
    assert top_page_hits(best, merged).tolist() == [True, True, False, False]
    assert top_page_recall(best, merged) == 0.5
    assert top_page_hits(np.array([-1, 3]), [np.array([-1, 3])]).tolist() == [False, True]  # -1 is no page
    # before the merge each query head has only its own ranked list: a page the other head found is no hit
    rows = np.array([[3, -1], [7, -1]])
    assert row_top_page_hits(np.array([7, 3]), rows).tolist() == [False, False]
    assert row_top_page_hits(np.array([3, 7]), rows).tolist() == [True, True]


def test_pages_covering_maps_positions_to_pages_and_skips_unpaged_positions():
    page_of = np.array([[0, 0, 1, 1, -1], [2, 2, 2, -1, -1]])
    out = pages_covering([np.array([0, 1, 4]), np.array([3, 4])], page_of)
    assert [o.tolist() for o in out] == [[0], []]
    out = pages_covering([np.array([1, 2]), np.array([0, 2])], page_of)
    assert [o.tolist() for o in out] == [[0, 1], [2]]


def test_top_token_hits_and_logit_gap():
    p = np.array([[0.1, 0.6, 0.3]])
    assert top_token_hits(p, [np.array([1])]).tolist() == [True]
    assert top_token_hits(p, [np.array([0, 2])]).tolist() == [False]
    # among candidates {0, 2} the best is 2: selecting 1 (not a candidate) is no hit
    assert top_token_hits(p, [np.array([1])], candidates=np.array([0, 2])).tolist() == [False]
    assert top_token_hits(p, [np.array([2])], candidates=np.array([0, 2])).tolist() == [True]
    assert top_logit_gap(p, [np.array([1, 2])]) == pytest.approx([0.0])
    assert top_logit_gap(p, [np.array([2])]) == pytest.approx([np.log(2.0)])
    assert top_logit_gap(p, [np.array([0, 1])], candidates=np.array([0, 2])) == pytest.approx([np.log(3.0)])
    assert np.isinf(top_logit_gap(p, [np.array([], np.int64)])[0])
    # GQA: both query heads of one KV head are judged against its one selection
    p2 = np.array([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1]])
    assert top_token_hits(p2, [np.array([1])]).tolist() == [True, False]
    assert top_logit_gap(p2, [np.array([1])]) == pytest.approx([0.0, np.log(3.5)])


def test_ratio_percentile_known_values():
    v = np.arange(1, 101) / 100
    assert ratio_percentile(v, np.ones(100), 5) == pytest.approx(0.0595)  # linear: 0.05 + 0.95 * 0.01
    assert ratio_percentile([1, 2, 3, 4], [2, 2, 2, 2], 0) == pytest.approx(0.5)
    assert ratio_percentile([1, 2, 3, 4], [2, 2, 2, 2], 100) == pytest.approx(2.0)
    assert ratio_percentile(np.array([[5.0, 1.0]]), np.array([[0.0, 2.0]]), 5) == pytest.approx(0.5)  # ref 0 skipped
    assert np.isnan(ratio_percentile([1.0], [0.0]))
    with pytest.raises(ValueError):
        ratio_percentile([1.0, 2.0], [1.0])


def _page_table(idx):
    ids = [idx.live_pages(h) for h in range(idx.H)]
    padded = np.full((idx.H, max(len(p) for p in ids)), -1, np.int64)
    for h, p in enumerate(ids):
        padded[h, : len(p)] = p
    pos = idx.page_positions(padded)
    return ids, [pos[h, : len(p)] for h, p in enumerate(ids)]


@pytest.mark.parametrize("n_pages", [3, 5])
def test_exhaustive_search_holds_every_query_heads_best_page(rng, n_pages):
    """On a real index: with every child scored and P >= group, the merged set holds each query head's exact
    best page (so top-page recall is 1), and by tokens the same question gives the same answer."""
    H, g, n, d = 2, 3, 700, 8
    K = rng.standard_normal((H, n, d)).astype(np.float32)
    Q = rng.standard_normal((H * g, d)).astype(np.float32)
    idx = PagedDCIIndex(H, d, config=IndexConfig(page_size=16))
    idx.build(K)
    ids, pos = _page_table(idx)
    best, scores = best_pages(Q, K, ids, pos)
    assert np.allclose(scores, [(Q[i].astype(np.float64) @ K[i // g].T.astype(np.float64)).max() for i in range(H * g)])
    merged = idx.query(Q, n_pages, QueryParams(**EXHAUSTIVE))
    assert top_page_recall(best, list(merged)) == 1.0
    sel = [np.sort(idx.pages_to_positions(h, merged[h][merged[h] >= 0])) for h in range(H)]
    probs = attention_probs(Q, K)
    assert top_token_hits(probs, sel).tolist() == top_page_hits(best, list(merged)).tolist()
    # one page for three query heads: the rank-major merge keeps the first query head's best page
    one = idx.query(Q, 1, QueryParams(**EXHAUSTIVE))
    hits = top_page_hits(best, list(one))
    assert all(hits[h * g] for h in range(H))
    assert hits.tolist() == [bool(best[i] == one[i // g, 0]) for i in range(H * g)]
