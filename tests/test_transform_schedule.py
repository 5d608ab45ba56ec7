"""T1 transform, T2 projections, the level schedule, T3 single-cell (flat DCI) exactness."""

import numpy as np
import pytest

from icecache_sglang.index.reference import dci_search
from icecache_sglang.index.schedule import LevelSchedule, schedule_levels
from icecache_sglang.index.transform import (augment_keys, augment_queries, key_projection, kk_distance,
                                             make_projection, query_projection, squared_norms)


@pytest.mark.parametrize("s", [1e-3, 1.0, "sqrtM", 100.0])
def test_t1_euclidean_order_equals_inner_product_order(rng, s):
    K = rng.standard_normal((500, 32)) * rng.uniform(0.2, 3.0, (500, 1))
    q = rng.standard_normal(32)
    M = squared_norms(K).max()
    scale = np.sqrt(M) if s == "sqrtM" else s
    dist = np.linalg.norm(augment_keys(K, M) - scale * augment_queries(q[None])[0], axis=1)
    ip = K @ q
    # same order: the distance is a decreasing affine function of <q, k>
    assert np.corrcoef(dist**2, ip)[0, 1] < -0.999999
    assert np.array_equal(np.argsort(dist, kind="stable")[:50], np.argsort(-ip, kind="stable")[:50])


def test_t1_augmented_norm_and_kk_distance(rng):
    A = rng.standard_normal((40, 16))
    B = rng.standard_normal((30, 16)) * 0.5
    M = max(squared_norms(A).max(), squared_norms(B).max())
    assert np.allclose(squared_norms(augment_keys(A, M)), M)
    half_sq = 0.5 * ((augment_keys(A, M)[:, None] - augment_keys(B, M)[None]) ** 2).sum(-1)
    assert np.allclose(kk_distance(A, B, M), half_sq, rtol=1e-4, atol=1e-9)


def test_t2_projection_vectors(rng):
    u = make_projection(24, seed=7, n_proj=8)
    assert np.allclose(np.linalg.norm(u, axis=1), 1.0)
    assert np.array_equal(u, make_projection(24, seed=7, n_proj=8))
    K = rng.standard_normal((10, 24))
    sqn = squared_norms(K)
    M = sqn.max()
    assert np.allclose(key_projection(K, sqn, M, u), augment_keys(K, M) @ u[0])
    q = rng.standard_normal((3, 24))
    assert np.allclose(query_projection(q, u), augment_queries(q) @ u[0])
    assert query_projection(np.zeros((1, 24)), u)[0] == 0.0


def test_level_schedule_matches_reference_sizes():
    expected = {32768: [32362, 324, 65, 14, 3], 131072: [129450, 1295, 260, 53, 11, 3],
                262144: [258904, 2590, 519, 104, 21, 5, 1]}
    for n, sizes in expected.items():
        assert np.bincount(schedule_levels(n, 0.01, 0.2)).tolist() == sizes


def test_level_schedule_persists_between_calls():
    s = LevelSchedule(0.1, 0.5)
    parts = np.concatenate([s.assign(7), s.assign(1), s.assign(300)])
    assert np.array_equal(parts, schedule_levels(308, 0.1, 0.5))


@pytest.mark.parametrize("m,L", [(1, 1), (2, 4), (2, 7)])
def test_t3_single_cell_exact_when_everything_is_retrieved(rng, m, L):
    K = rng.standard_normal((300, 16))
    for _ in range(5):
        q = rng.standard_normal(16)
        got = dci_search(K, q, 10, m, L, seed=3, prop_to_retrieve=1.0)
        assert got == np.argsort(-(K @ q), kind="stable")[:10].tolist()


def test_t3_partial_search_finds_most_of_the_top(rng):
    centers = rng.standard_normal((20, 16)) * 3
    K = centers[rng.integers(0, 20, 400)] + rng.standard_normal((400, 16)) * 0.3
    hits = 0
    for _ in range(10):
        q = centers[rng.integers(0, 20)] + rng.standard_normal(16) * 0.1
        got = dci_search(K, q, 10, 2, 4, seed=3, prop_to_retrieve=0.3)
        hits += len(set(got) & set(np.argsort(-(K @ q))[:10].tolist()))
    assert hits >= 70


def test_squared_norms_and_projections_are_the_same_bits_whichever_driver_runs(rng):
    """A build's keys (the parallel driver) and an insert's few (the serial one) get the same bits for the
    same key: the float64 sum rounded once to float32 (the index keeps float32, ``pagetable.TREE_FLOAT``), for
    float32 and float64 keys."""
    from icecache_sglang.index.keys import PARALLEL_MIN

    u = make_projection(37, 5)
    for dtype in (np.float32, np.float64):
        K = (rng.standard_normal((2, PARALLEL_MIN // 37 + 9, 37)) * 4).astype(dtype)  # d not a multiple of 4
        big = squared_norms(K)
        few = np.stack([squared_norms(K[h, i]) for h in range(2) for i in range(0, K.shape[1], 97)])
        assert big.shape == K.shape[:2] and (few == big[:, ::97].ravel()).all()
        exact = np.einsum("...d,...d->...", K.astype(np.float64), K.astype(np.float64))
        assert (big.astype(np.float32) == big).all()  # as the index stores them
        assert (np.abs(big - exact) <= 2.0 ** -24 * exact * (1 + 1e-9)).all()  # within half a float32 ulp
        M = big.max()
        p_big = key_projection(K[0], big[0], M, u)
        p_few = np.array([key_projection(K[0, i:i + 1], big[0, i:i + 1], M, u)[0] for i in range(0, K.shape[1], 97)])
        assert (p_few == p_big[::97]).all()
