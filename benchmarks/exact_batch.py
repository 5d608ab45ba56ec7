"""The indexer's exact selection (the server's default) for a batch of small sequences: one numba call over every
(sequence, KV head) pair (``index/scan_batch.py``) against the path before it, one ``select_baseline`` per
sequence (five or six numba calls each, on the query's thread alone below ``SERIAL_SCAN_ELEMENTS``).

Arms, all through the same ``IndexerService._query`` (a ``Query`` message as the socket loop hands it over):
``batched`` (the service's rule: one thread for fewer than ``SERIAL_BATCH_SEQUENCES`` small sequences),
``batched_one_thread`` (the small ones), ``batched_all_threads`` (every sequence in the batch, on every thread) and
``one_at_a_time``. Same process, the same indexes built the
way the server builds them (int8 rows rescored from a bfloat16 key store, the mass merge), interleaved query by
query with each arm going first in turn, so drift of this machine's speed and warm caches favour none; the pages
and slots are checked equal. Shapes are real models' attention per rank: SmolLM2-135M (3 KV heads x 3 query
heads, d=64), Qwen2.5-0.5B (2 x 7, d=64), Llama-3.1-8B at TP 8 (1 x 4, d=128) and TP 1 (8 x 4). Contexts stay
below ``SERIAL_SCAN_ELEMENTS`` key elements per sequence, or with ``--long`` above it (Qwen2.5-0.5B at 16k and 64k,
Llama-3.1-8B at 4k and 32k: a query's long sequences are scanned together when it has ``BATCHED_LONG_SEQUENCES`` of
them and they are below ``LONGEST_BATCHED_ELEMENTS``, apart from its small ones). Synthetic low-rank keys.

    python benchmarks/exact_batch.py            # ~3 min on 2 cores
    python benchmarks/exact_batch.py --quick    # < 1 min
    python benchmarks/exact_batch.py --long     # sequences above SERIAL_SCAN_ELEMENTS, ~3 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the indexer's policy (server.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, replot, write_records  # noqa: E402

from icecache_sglang.index.config import IndexConfig  # noqa: E402
from icecache_sglang.index.keys import to_storage  # noqa: E402
from icecache_sglang.index.synthetic import lowrank_keys  # noqa: E402
from icecache_sglang.indexer import KeyStore  # noqa: E402
from icecache_sglang.indexer import protocol as p  # noqa: E402
from icecache_sglang.indexer import service as svc  # noqa: E402
from icecache_sglang.indexer.config import IndexerConfig  # noqa: E402

SERIAL_BATCH_SEQUENCES, BATCHED_SCANS = svc.SERIAL_BATCH_SEQUENCES, svc.BATCHED_SCANS  # the service's settings
LONGEST_BATCHED_ELEMENTS, BATCHED_LONG_SEQUENCES = svc.LONGEST_BATCHED_ELEMENTS, svc.BATCHED_LONG_SEQUENCES
SHAPES = {"SmolLM2-135M": (3, 3, 64), "Qwen2.5-0.5B": (2, 7, 64), "Llama-3.1-8B TP8": (1, 4, 128),
          "Llama-3.1-8B": (8, 4, 128)}
#: contexts at or above ``SERIAL_SCAN_ELEMENTS`` (``--long``): several such sequences below ``LONGEST_BATCHED_ELEMENTS``
#: are scanned together, one alone one at a time (``batched`` is the service's rule; ``batched_all_threads`` puts
#: every sequence in the batch, whatever its length or count)
LONG = {"Qwen2.5-0.5B": [16384, 65536], "Llama-3.1-8B": [4096, 32768]}
P, C = 16, 16  # a 256-token budget of 16-token pages


def measure(shape: str, context: int, batches: list[int], reps: int, rng) -> list[dict]:
    H, g, d = SHAPES[shape]
    top = max(batches)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        store = KeyStore.create(tmp, 1, top * context, H, d, "bfloat16")
        cfg = IndexerConfig(0, store.spec, f"ipc://{tmp}/unused", tmp, index=IndexConfig(page_size=C, key_dtype="int8"))
        service = svc.IndexerService(cfg, store)
        queries = []
        for b in range(top):
            K, Q = lowrank_keys(rng, context, d, heads=H, group=g, n_queries=reps)
            slots = np.arange(b * context, (b + 1) * context)
            store.keys[0, slots] = to_storage(np.ascontiguousarray(K.transpose(1, 0, 2)), "bfloat16")
            service.handle(*p.as_received(0, p.Build(seq=b, layers=[0]), {"slots": slots.astype(np.int32)}))
            queries.append(Q)
        records = []
        try:
            records += _measure_batches(service, queries, shape, context, batches, reps, H, g, d)
        finally:
            svc.BATCHED_SCANS = BATCHED_SCANS
            service.close()
            store.close()
    return records


def _measure_batches(service, queries, shape, context, batches, reps, H, g, d) -> list[dict]:
    """Each batch size's record: every arm over the same query messages, interleaved."""
    records = []
    for B in batches:
        op = p.Query(layer=0, seqs=list(range(B)), n_pages=P, policy="exact", merge="mass", want_slots=True)
        msgs = [p.as_received(0, op, {"q": np.stack([queries[b][k] for b in range(B)]).astype(np.float32)})
                for k in range(reps)]
        modes = ("batched", "batched_one_thread", "batched_all_threads", "one_at_a_time")
        times = {m: [] for m in modes}
        answers = {}
        for k in range(reps + 2):  # two untimed rounds first (caches, numba's threads)
            for mode in modes[k % len(modes):] + modes[: k % len(modes)]:  # each goes first in turn
                svc.BATCHED_SCANS = () if mode == "one_at_a_time" else BATCHED_SCANS
                svc.SERIAL_BATCH_SEQUENCES = {"batched_one_thread": 1 << 62, "batched_all_threads": 0}.get(
                    mode, SERIAL_BATCH_SEQUENCES)  # "batched": the service's rule
                forced = mode == "batched_all_threads"  # every sequence in the batch, whatever its length
                svc.LONGEST_BATCHED_ELEMENTS = 1 << 62 if forced else LONGEST_BATCHED_ELEMENTS
                svc.BATCHED_LONG_SEQUENCES = 1 if forced else BATCHED_LONG_SEQUENCES
                try:
                    t = time.perf_counter()
                    _, out = service.handle(*msgs[k % reps])
                    dt = time.perf_counter() - t
                finally:
                    svc.SERIAL_BATCH_SEQUENCES = SERIAL_BATCH_SEQUENCES
                    svc.LONGEST_BATCHED_ELEMENTS = LONGEST_BATCHED_ELEMENTS
                    svc.BATCHED_LONG_SEQUENCES = BATCHED_LONG_SEQUENCES
                if k >= 2:
                    times[mode].append(dt)
                if k == 0:
                    answers[mode] = out
        same = all(np.array_equal(answers[m][a], answers["one_at_a_time"][a]) for m in modes for a in ("pages", "slots"))
        rec = {"model_shape": shape, "kv_heads": H, "q_heads": H * g, "head_dim": d, "context": context,
               "batch": B, "n_pages": P, "page_size": C, "reps": reps, "same_answers": same,
               "numba_threads": numba.get_num_threads(), "batch_elements": B * context * H * d,
               "serial_batch_sequences": SERIAL_BATCH_SEQUENCES,
               **{f"{m}_us": float(np.median(times[m])) * 1e6 for m in modes}}
        rec["speedup"] = rec["one_at_a_time_us"] / rec["batched_us"]
        print(f"  {shape:18s} ctx {context:5d} B {B:2d}: one at a time {rec['one_at_a_time_us']:7.0f} us, "
              f"batched {rec['batched_us']:7.0f} us ({rec['speedup']:.2f}x; one thread "
              f"{rec['batched_one_thread_us']:7.0f}, all threads {rec['batched_all_threads_us']:7.0f} us), "
              f"same answers: {same}", flush=True)
        records.append(rec)
    return records


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["model_shape"] for r in records))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for ctx in sorted({r["context"] for r in records if r["model_shape"] == shape}):
            rs = sorted((r for r in records if r["model_shape"] == shape and r["context"] == ctx), key=lambda r: r["batch"])
            b = [r["batch"] for r in rs]
            line, = ax.plot(b, [r["one_at_a_time_us"] / 1e3 for r in rs], "o--", label=f"{ctx} tokens, one at a time")
            ax.plot(b, [r["batched_us"] / 1e3 for r in rs], "s-", color=line.get_color(), label=f"{ctx} tokens, batched")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequences per query")
        ax.set_ylabel("exact selection, one layer (ms, measured)")
        ax.set_title(shape, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    r0 = records[0]
    fig.suptitle(f"Exact selection of small sequences: one numba call vs one sequence at a time "
                 f"(P={r0['n_pages']} pages of {r0['page_size']}; {r0.get('machine', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one context per shape, few repetitions")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--long", action="store_true", help="sequences above SERIAL_SCAN_ELEMENTS (exact_batch_long.*)")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the existing JSON")
    args = ap.parse_args(argv)
    name = "exact_batch"
    if args.replot:
        replot(name + ("_long" if args.long else ""), plot)
        return
    reps = args.reps or (10 if args.quick else 40)
    batches = [1, 4, 12] if args.quick else [1, 2, 4, 8, 16, 32]
    rng = np.random.default_rng(0)
    records = []
    if args.long:
        name += "_long"
        for shape, contexts in LONG.items():
            for ctx in contexts:
                records += measure(shape, ctx, [1, 2, 4, 8], args.reps or 20, rng)
    else:
        for shape, (H, g, d) in SHAPES.items():
            if shape == "Llama-3.1-8B":
                continue  # (its small sequences: below 1024 tokens; at TP 8 above)
            longest = (svc.SERIAL_SCAN_ELEMENTS - 1) // (H * d)  # the longest sequence scanned with the batch
            contexts = [min(2048, longest)] if args.quick else sorted({512, 2048, min(4096, longest)})
            for ctx in contexts:
                records += measure(shape, ctx, batches, reps, rng)
    path = write_records(name, args.quick, records)
    plot(json.loads(path.read_text()), png_path(name, args.quick))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
