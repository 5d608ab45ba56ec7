"""T11 quality checks on synthetic keys (n = 32k, d = 128, C = 16, P = 12 pages, fov = 49), plus the
metrics themselves. Absolute numbers against the spec's prototype live in benchmarks/index_quality.py;
here the claims are relative, so that they hold for any reasonable generator."""

import numpy as np
import pytest

from icecache_sglang.index.config import QueryParams
from icecache_sglang.index.metrics import attention_probs, mass_recall, output_rel_err, recall_at_k
from icecache_sglang.index.selection import POLICIES
from icecache_sglang.index.synthetic import clustered_keys, lowrank_keys  # noqa: F401  (used by other tests)


def _scores(K, Q, methods, budget=192, params=QueryParams(fov=49)):
    out = {}
    for name in methods:
        pol = POLICIES[name](page_size=16)
        if name == "icecache":
            pol.params = params
        pol.build(K)
        m, r = [], []
        for q in Q:
            probs = attention_probs(q, K)
            sel = pol.select(q, budget)
            m.append(mass_recall(probs, sel))
            r.append(recall_at_k(probs, sel, 64))
        out[name] = (float(np.mean(m)), float(np.mean(r)))
    return out


@pytest.mark.slow
def test_t11_clustered_semantic_pages_beat_positional(rng):
    K, Q = clustered_keys(rng, 32768, 128, n_clusters=256, n_queries=20)
    s = _scores(K, Q, ["icecache", "oracle_page", "oracle_positional", "quest", "streaming"])
    assert s["oracle_page"][0] > s["oracle_positional"][0] + 0.3, s
    assert s["icecache"][0] >= 0.85 * s["oracle_page"][0], s
    assert s["icecache"][0] > 3 * s["quest"][0] and s["icecache"][0] > 3 * s["streaming"][0], s
    assert s["icecache"][1] >= 0.75, s  # recall@64


@pytest.mark.slow
def test_t11_lowrank_and_isotropic(rng):
    K, Q = lowrank_keys(rng, 32768, 128, n_queries=20)
    s = _scores(K, Q, ["icecache", "oracle_page"])
    assert s["icecache"][0] >= 0.85 * s["oracle_page"][0], s
    K = rng.standard_normal((1, 32768, 128)).astype(np.float32)
    Q = rng.standard_normal((20, 1, 128)).astype(np.float32)
    s = _scores(K, Q, ["icecache", "oracle_page"])
    assert s["icecache"][0] >= 0.4 * s["oracle_page"][0], s  # isotropic: the worst case


def test_oracle_token_bounds_every_policy(rng):
    K, Q = clustered_keys(rng, 4000, 32, n_clusters=32, n_queries=5, heads=2, group=3)
    s = _scores(K, Q, list(POLICIES), budget=128)
    assert all(v[0] <= s["oracle_token"][0] + 1e-9 for v in s.values()), s
    # without GQA the oracle holds every true top-64 token
    K, Q = clustered_keys(rng, 4000, 32, n_clusters=32, n_queries=3, heads=2, group=1)
    assert _scores(K, Q, ["oracle_token"], budget=128)["oracle_token"][1] == 1.0


def test_metrics_limits(rng):
    K = rng.standard_normal((2, 300, 16)).astype(np.float32)
    V = rng.standard_normal((2, 300, 8)).astype(np.float32)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    probs = attention_probs(q, K)
    assert np.allclose(probs.sum(axis=1), 1.0)
    everything = [np.arange(300)] * 2
    assert mass_recall(probs, everything) == pytest.approx(1.0)
    assert recall_at_k(probs, everything, 10) == 1.0
    assert output_rel_err(probs, V, everything) < 1e-12
    errs = [output_rel_err(probs, V, [np.arange(k)] * 2) for k in (10, 100, 299)]
    assert errs[0] > errs[-1]
    assert mass_recall(probs, [np.array([], np.int64)] * 2) == 0.0


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_respects_the_budget(rng, name):
    K, Q = clustered_keys(rng, 2000, 16, n_clusters=16, n_queries=2, heads=2, group=2)
    pol = POLICIES[name](page_size=16)
    pol.build(K)
    for budget in (16, 100, 256):
        sel = pol.select(Q[0], budget)
        assert len(sel) == 2
        for s in sel:
            assert 0 < len(s) <= budget and np.all(np.diff(s) > 0) and s.min() >= 0 and s.max() < 2000
