"""What one Build of a prompt's layers costs the indexer: its layers one after another (``write_workers: 1``)
against the write workers (several layers side by side, each worker with an even share of the numba threads);
and what another sequence's queries wait while that Build runs, through a real indexer process and socket
(``query_during_build``: the indexer answers them between the Build's layers' work, not after it).

The indexer's own request handling (``IndexerService``, in process) over a real bfloat16 key store, with the
server's index settings (``IceCacheConfig().index_config()``), ``LAYERS`` layers of 8 KV heads x 128 dims of
low-rank keys (``index/synthetic.py``). The settings are interleaved per repetition on the same keys.
``model_seconds_computed`` scales the measured time to 30 anchor layers (Llama-3.1-8B with 2 dense
layers): a computed figure, not a measured one.

    python benchmarks/build_workers.py --quick     # 8k, 32k: ~2 min on 2 cores
    python benchmarks/build_workers.py             # and 128k, 2 repetitions
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import plot_log_lines, png_path, replot, write_records  # noqa: E402

import numba  # noqa: E402

from icecache_sglang.index.keys import to_storage  # noqa: E402
from icecache_sglang.index.synthetic import lowrank_keys  # noqa: E402
from icecache_sglang.indexer import Indexer  # noqa: E402
from icecache_sglang.indexer.blas import blas_threads, set_blas_threads  # noqa: E402
from icecache_sglang.indexer import protocol as p  # noqa: E402
from icecache_sglang.indexer.config import IndexerConfig  # noqa: E402
from icecache_sglang.indexer.keystore import KeyStore  # noqa: E402
from icecache_sglang.indexer.service import IndexerService  # noqa: E402
from icecache_sglang.runtime.config import IceCacheConfig  # noqa: E402

H_KV, D, LAYERS, ANCHORS = 8, 128, 8, 30
NAME = "build_workers"


def service(store: KeyStore, tmp: str, workers: int | None) -> IndexerService:
    cfg = IndexerConfig(rank=0, store=store.spec, endpoint=f"ipc://{tmp}/s", private_dir=tmp,
                        index=IceCacheConfig().index_config(), write_workers=workers)
    svc = IndexerService(cfg, store)
    svc.warmup()
    return svc


def build_all(svc: IndexerService, seq: int, n: int, blas: int) -> float:
    set_blas_threads(blas)
    req = p.Request(v=p.PROTOCOL_VERSION, id=seq, op=p.Build(seq=seq, layers=list(range(LAYERS))))
    t = time.perf_counter()
    result, _ = svc.handle(req, {"slots": np.arange(n, dtype=np.int32)})
    dt = time.perf_counter() - t
    assert result.tokens == [n] * LAYERS
    svc.handle(p.Request(v=p.PROTOCOL_VERSION, id=seq, op=p.Release(seqs=[seq])), {})
    return dt


def fill(store: KeyStore, n: int) -> None:
    for layer in range(LAYERS):
        K, _ = lowrank_keys(np.random.default_rng(layer), n, D, rank=16, n_queries=1, heads=H_KV)
        store.write(layer, np.arange(n), to_storage(np.ascontiguousarray(K.transpose(1, 0, 2)), "bfloat16"))


def query_during_build(n: int, other: int = 4096, n_pages: int = 14) -> dict:
    """Latency of one query for a sequence of ``other`` tokens: idle, and while a Build of ``n`` tokens of
    every layer of another sequence runs in the same indexer process."""
    ix = Indexer.launch(num_layers=LAYERS, num_kv_heads=H_KV, head_dim=D, num_slots=n + other, key_dtype="bfloat16",
                        index=IceCacheConfig().index_config(), timeout_s=120.0)
    try:
        fill(ix.store, n + other)
        c = ix.client
        c.build(2, range(LAYERS), np.arange(n, n + other))
        c.sync(timeout_s=120)
        q = np.random.default_rng(9).standard_normal((1, 4 * H_KV, D)).astype(np.float32)

        def one(i):
            t = time.perf_counter()
            c.call(p.Query(layer=i % LAYERS, seqs=[2], n_pages=n_pages), {"q": q}, timeout_s=300)
            return time.perf_counter() - t
        idle = [one(i) for i in range(60)]
        t0 = time.perf_counter()
        rid = c.build(1, range(LAYERS), np.arange(n))
        during = []
        while not c.acked_through(rid):
            during.append(one(len(during)))
        build_s = time.perf_counter() - t0
        c.sync(timeout_s=5)
    finally:
        ix.close()
    pct = lambda xs, q: float(np.percentile(xs, q) * 1e3)  # noqa: E731
    return {"measure": "query_during_build", "context": n, "other_tokens": other, "layers": LAYERS, "heads": H_KV,
            "head_dim": D, "n_pages": n_pages, "build_s": build_s, "queries_during_build": len(during),
            "idle_ms_p50": pct(idle, 50), "idle_ms_p99": pct(idle, 99), "during_ms_p50": pct(during, 50),
            "during_ms_p99": pct(during, 99), "during_ms_max": float(np.max(during) * 1e3)}


def plot(records, path: Path) -> None:
    records = [r for r in records if r.get("measure") != "query_during_build"]
    r0 = records[0]
    settings = sorted({(r["write_workers"], r.get("blas_threads") or 0) for r in records})
    series = [(f"write_workers {w}" + (" (one layer at a time)" if w == 1 else "")
               + (f", BLAS threads {b}" if b else ""), ("o-" if w == 1 else "s--") if b in (0, 1) else ":^",
               [(r["context"], r["seconds_median"]) for r in records
                if (r["write_workers"], r.get("blas_threads") or 0) == (w, b)]) for w, b in settings]
    plot_log_lines(path, series, f"one Build of {r0['layers']} layers ({H_KV} KV heads, d={D}) in the indexer;\n"
                   f"measured, {r0['threads']} threads: {r0['machine'][:60]}", "prompt tokens",
                   f"seconds for {r0['layers']} layers", figsize=(6, 3.8), title_size=8)


def main(argv=None) -> None:
    global LAYERS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--replot", action="store_true")
    ap.add_argument("--workers", default=None, help="comma-separated write_workers settings (default: 1 and "
                    "the indexer's default for this machine)")
    ap.add_argument("--blas", default=None, help="comma-separated OpenBLAS thread counts to compare (default: "
                    "the indexer's, 1); 0 = every core (NumPy's default)")
    ap.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default: 8k, 32k[, 128k])")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--no-query", action="store_true", help="skip query_during_build")
    args = ap.parse_args(argv)
    LAYERS = args.layers
    if args.replot:
        return replot(NAME, plot)
    contexts = ([int(c) for c in args.contexts.split(",")] if args.contexts
                else [8192, 32768] + ([] if args.quick else [131072]))
    cores = max(blas_threads().values(), default=1)  # NumPy's default: every core
    blas_settings = [int(b) or cores for b in args.blas.split(",")] if args.blas else [1]
    reps = 1 if args.quick else 2
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore.create(tmp, LAYERS, max(contexts), H_KV, D, dtype="bfloat16")
        fill(store, max(contexts))
        default = service(store, tmp, None)
        workers = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, default.write_workers})
        default.close()
        services = {w: service(store, tmp, w) for w in workers}
        settings = [(w, b) for w in workers for b in blas_settings]
        for n in contexts:
            times = {s: [] for s in settings}
            for rep in range(reps):
                for w, b in (settings if rep % 2 == 0 else settings[::-1]):
                    times[w, b].append(build_all(services[w], rep + 1, n, b))
            for (w, b), ts in times.items():
                s = float(np.median(ts))
                base = float(np.median(times[1, b])) if (1, b) in times else None
                records.append({"context": n, "layers": LAYERS, "heads": H_KV, "head_dim": D, "write_workers": w,
                                "blas_threads": b, "threads": numba.get_num_threads(), "reps": reps, "seconds": ts,
                                "seconds_median": s, "seconds_per_layer": s / LAYERS,
                                "model_seconds_computed": s / LAYERS * ANCHORS,
                                "speedup_vs_one_layer_at_a_time": base / s if base else None})
                print(f"{n:>7} write_workers {w} blas {b:>2}: {s:7.2f} s for {LAYERS} layers"
                      + (f"  x{base / s:.2f}" if base else ""), flush=True)
        for svc in services.values():
            svc.close()
        store.close()
    for n in ([] if args.no_query else [c for c in contexts if c > 8192]):  # a Build long enough to send queries during it
        r = query_during_build(n)
        records.append({**r, "threads": numba.get_num_threads()})
        print(f"{n:>7} another sequence's query: idle p50 {r['idle_ms_p50']:.2f} ms, during a {r['build_s']:.1f} s "
              f"Build p50 {r['during_ms_p50']:.2f} / p99 {r['during_ms_p99']:.2f} / max {r['during_ms_max']:.1f} ms "
              f"({r['queries_during_build']} queries)", flush=True)
    path = write_records(NAME, args.quick, records)
    plot(json.loads(path.read_text()), png_path(NAME, args.quick))


if __name__ == "__main__":
    main()
