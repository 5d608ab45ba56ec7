"""Is an IVF-style parent search (issue 14's build goal) faster than the exact one on this CPU?

The build's largest cost is the exact level-0 parent search (``transform.exact_parents``: one float32 BLAS
matmul of the augmented children against every level-1 token, ``n x n/100 x (d+1)`` multiply-adds per head).
The IVF variant measured here stays in BLAS too: the parents are grouped into ``sqrt(m)`` lists (two
k-means steps over the augmented parents), each child scores the list centroids and then only the parents
of its ``n_probe`` best lists, one matmul per list over the children that probe it. Reported per context
and ``n_probe``: the time of both on one head of low-rank synthetic keys (d 128), the share of children
given their exact parent, and the mean ``D_kk`` excess of the others' parents (relative to ``M``).
Measured on the same keys in one process; not used by the index (the numbers say why).

    python benchmarks/parent_search.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_log_lines, png_path, write_records  # noqa: E402

from icecache_sglang.index.synthetic import lowrank_keys  # noqa: E402
from icecache_sglang.index.transform import _augmented_f32, exact_parents, squared_norms  # noqa: E402


def ivf_parents(ck, pk, m, csq, psq, n_probe=4, seed=0):
    """Approximate ``exact_parents``: the best parent among the ``n_probe`` nearest lists' parents."""
    n_p = pk.shape[0]
    L = max(1, int(round(np.sqrt(n_p))))
    pa, ca = _augmented_f32(pk, psq, m), _augmented_f32(ck, csq, m)
    cent = pa[np.sort(np.random.default_rng(seed).choice(n_p, L, replace=False))]
    for _ in range(2):  # k-means steps (augmented keys all have norm sqrt(M): nearest = largest dot product)
        assign = np.argmax(pa @ cent.T, 1)
        sums = np.zeros_like(cent)
        np.add.at(sums, assign, pa)
        cnt = np.bincount(assign, minlength=L)
        cent = np.where(cnt[:, None] > 0, sums / np.maximum(cnt, 1)[:, None], cent).astype(np.float32)
    assign = np.argmax(pa @ cent.T, 1)
    probe = np.argpartition(-(ca @ cent.T), n_probe - 1, axis=1)[:, :n_probe]
    flat, kids = probe.ravel(), np.repeat(np.arange(ck.shape[0]), n_probe)
    o = np.argsort(flat, kind="stable")
    flat, kids = flat[o], kids[o]
    bounds = np.searchsorted(flat, np.arange(L + 1))
    best = np.full(ck.shape[0], -np.inf, np.float32)
    arg = np.full(ck.shape[0], n_p, np.int64)
    for lst in range(L):
        k, mem = kids[bounds[lst]:bounds[lst + 1]], np.flatnonzero(assign == lst)
        if k.size == 0 or mem.size == 0:
            continue
        s = ca[k] @ pa[mem].T
        j = np.argmax(s, 1)
        v, p = s[np.arange(k.size), j], mem[j]
        better = (v > best[k]) | ((v == best[k]) & (p < arg[k]))
        best[k[better]], arg[k[better]] = v[better], p[better]
    return arg


def main() -> None:
    rng = np.random.default_rng(0)
    records = []
    for n in (32768, 131072):
        K, _ = lowrank_keys(rng, n, 128, rank=16, n_queries=1, heads=1)
        K = K[0]
        sq = squared_norms(K)
        M = float(sq.max())
        ups = np.sort(rng.choice(n, n // 100, replace=False))
        t = time.perf_counter()
        ex = exact_parents(K, K[ups], M, 8192, sq, sq[ups])
        t_exact = time.perf_counter() - t
        pa, ca = _augmented_f32(K[ups], sq[ups], M), _augmented_f32(K, sq, M)
        s_ex = np.einsum("nd,nd->n", ca, pa[ex])
        for n_probe in (2, 4, 8):
            t = time.perf_counter()
            iv = ivf_parents(K, K[ups], M, sq, sq[ups], n_probe=n_probe)
            t_ivf = time.perf_counter() - t
            rec = {"context": n, "parents": int(ups.size), "n_probe": n_probe, "exact_s": t_exact, "ivf_s": t_ivf,
                   "speedup": t_exact / t_ivf, "exact_parent_share": float(np.mean(ex == iv)),
                   "dkk_excess_rel_mean": float(np.mean(s_ex - np.einsum("nd,nd->n", ca, pa[iv])) / M)}
            records.append(rec)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
    write_records("parent_search", False, records)
    plot_log_lines(png_path("parent_search", False),
                   [(f"IVF, n_probe {p}", "o-", [(r["context"], r["ivf_s"]) for r in records if r["n_probe"] == p])
                    for p in (2, 4, 8)]
                   + [("exact (BLAS)", "ks-", [(r["context"], r["exact_s"]) for r in records if r["n_probe"] == 2])],
                   "level-0 parent search, one head, d 128 (measured)", "tokens", "seconds")


if __name__ == "__main__":
    main()
