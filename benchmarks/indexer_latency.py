"""What the process boundary costs: one Query message through the indexer process (ZeroMQ ipc, msgspec
header, raw array frames, reply with pages and slots) against the same query in process (the same
``IndexerService`` code over the same shared key store and identically built indexes), plus sustained
query messages per second with several queries in flight. Also, in process, the same sequences searched
one at a time (KV heads in parallel) instead of as one batch (every (sequence, KV head) pair in parallel).

Shape: Llama-3.1-8B attention, all KV heads of one layer of one rank (``--kv-heads 8``: TP 1, 32 query
heads; ``--kv-heads 1``: TP 8, 4 query heads), head_dim 128,
P = 12 pages of 16 tokens, low-rank "LLM-like" keys. A batch of B sequences is B sequence ids over
``--distinct`` independently built indexes (shared copy-on-write, as radix-cache hits share them), so a
batch of 64 at 32k does not need 64 separate 32k builds; every sequence still runs its own search.

    python benchmarks/indexer_latency.py --quick   # < 2 min
    python benchmarks/indexer_latency.py           # 8k and 32k, 8 distinct indexes
    python benchmarks/indexer_latency.py --kv-heads 1 --name indexer_latency_tp8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the indexer's policy (server.py), for a fair comparison
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, write_records  # noqa: E402

from icecache_sglang.index.config import IndexConfig  # noqa: E402
from icecache_sglang.index.synthetic import lowrank_keys  # noqa: E402
from icecache_sglang.indexer import Indexer, KeyStore  # noqa: E402
from icecache_sglang.indexer import protocol as p  # noqa: E402
from icecache_sglang.indexer.service import IndexerService  # noqa: E402

GROUP, D, P, C = 4, 128, 12, 16  # Llama-3.1-8B: 32 query heads over 8 KV heads


def _local(service: IndexerService, op, arrays=None):
    return service.handle(*p.as_received(0, op, arrays))


def median_us(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return float(np.median(out)) * 1e6


def _zmq_echo(endpoint: str) -> None:
    import zmq

    s = zmq.Context().socket(zmq.ROUTER)
    s.bind(endpoint)
    while True:
        s.send_multipart(s.recv_multipart())


def _pipe_echo(conn) -> None:
    while True:
        conn.send_bytes(conn.recv_bytes())


def transport_floor(n: int = 500) -> dict:
    """What moving a 16 KB message (a batch-1 query) to another process and back costs on this machine with
    nothing else in the way: bare pyzmq DEALER/ROUTER over ipc, and a multiprocessing pipe."""
    import multiprocessing as mp
    import tempfile

    import zmq

    ctx = mp.get_context("spawn")
    payload = np.zeros(4096, np.float32).tobytes()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        ep = f"ipc://{d}/echo.sock"
        proc = ctx.Process(target=_zmq_echo, args=(ep,), daemon=True)
        proc.start()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ep)
        sock.send(payload)
        sock.recv()
        out["raw_zmq_rtt_us"] = median_us(lambda: (sock.send(payload), sock.recv()), n)
        sock.close(0)
        proc.kill()
    a, b = ctx.Pipe()
    proc = ctx.Process(target=_pipe_echo, args=(b,), daemon=True)
    proc.start()
    a.send_bytes(payload)
    a.recv_bytes()
    out["raw_pipe_rtt_us"] = median_us(lambda: (a.send_bytes(payload), a.recv_bytes()), n)
    proc.kill()
    return out


def run_context(ix: Indexer, local: IndexerService, context: int, distinct: int, batches: list[int], reps: int,
                depth: int, rng) -> list[dict]:
    c = ix.client
    H_KV = local.H
    c.reset()
    _local(local, p.Reset())
    queries = []
    for i in range(distinct):
        K, Q = lowrank_keys(rng, context, D, heads=H_KV, group=GROUP, n_queries=reps + depth + 4)
        slots = np.arange(i * context, (i + 1) * context, dtype=np.int64)
        ix.store.keys[0, slots] = K.transpose(1, 0, 2)
        queries.append(Q)
        t = time.perf_counter()
        c.build(i, [0], slots)
        c.sync(timeout_s=3600)
        build_s = time.perf_counter() - t
        _local(local, p.Build(seq=i, layers=[0]), {"slots": slots.astype(np.int32)})
        print(f"  context {context}: index {i} built in {build_s:.1f} s", flush=True)
    top = max(batches)
    for j in range(top):  # sequence 1000 + j reads index j % distinct (copy-on-write share, no copy)
        c.share(j % distinct, 1000 + j, context)
        _local(local, p.Share(src=j % distinct, dst=1000 + j, prefix_len=context))
    c.sync()
    records = []
    for B in batches:
        seqs = [1000 + j for j in range(B)]
        qs = [np.stack([queries[j % distinct][k] for j in range(B)]) for k in range(reps + depth + 4)]
        op = p.Query(layer=0, seqs=seqs, n_pages=P)
        # same answers both ways
        sel = c.query(0, seqs, qs[0], P, timeout_s=600)
        _, out = _local(local, op, {"q": qs[0]})
        assert not sel.fallback and np.array_equal(sel.pages, out["pages"]) and np.array_equal(sel.slots, out["slots"])
        decoded = [p.as_received(0, op, {"q": qs[k]}) for k in range(reps)]
        indexes = [local.table.get(s, 0) for s in seqs]
        in_t, loop_t, ipc_t, server_us = [], [], [], []
        for k in range(reps):  # interleaved, so drift of this machine's speed hits both sides alike
            t = time.perf_counter()
            local.handle(*decoded[k])  # in process: no serialization, no socket
            in_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            for b, idx in enumerate(indexes):  # one sequence at a time, KV heads in parallel (no batching)
                idx.page_positions(idx.query(qs[k][b], P))
            loop_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            s = c.query(0, seqs, qs[k], P, timeout_s=600)
            ipc_t.append(time.perf_counter() - t)
            server_us.append(s.search_us)
        in_us, ipc_us = float(np.median(in_t)) * 1e6, float(np.median(ipc_t)) * 1e6
        # sustained: keep `depth` queries in flight
        n_msgs = reps + depth
        t = time.perf_counter()
        inflight = [c.query_async(0, seqs, qs[k], P) for k in range(depth)]
        for k in range(depth, n_msgs):
            assert not c.query_result(inflight.pop(0), 600).fallback
            inflight.append(c.query_async(0, seqs, qs[k % len(qs)], P))
        for rid in inflight:
            assert not c.query_result(rid, 600).fallback
        qps = n_msgs / (time.perf_counter() - t)
        srv = float(np.median(server_us))
        rec = {"batch": B, "context": context, "in_process_us": in_us, "ipc_us": ipc_us,
               "in_process_per_sequence_us": float(np.median(loop_t)) * 1e6,
               "server_search_us": srv, "boundary_us": ipc_us - srv, "overhead_us": ipc_us - in_us,
               "overhead_pct": 100 * (ipc_us - in_us) / in_us, "queries_per_s": qps, "sequences_per_s": qps * B,
               "depth": depth, "distinct_indexes": distinct, "kv_heads": H_KV, "q_heads": GROUP * H_KV, "head_dim": D,
               "n_pages": P, "page_size": C, "reps": reps}
        print(f"  B={B:3d} ctx={context}: in-process {in_us:9.0f} us  ipc {ipc_us:9.0f} us  "
              f"(+{rec['overhead_us']:.0f} us, {rec['overhead_pct']:+.1f}%)  {qps:.1f} msg/s", flush=True)
        records.append(rec)
    c.release(list(range(distinct)) + [1000 + j for j in range(top)])
    _local(local, p.Reset())
    c.sync()
    return records


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ctx in sorted({r["context"] for r in records}):
        rs = sorted((r for r in records if r["context"] == ctx), key=lambda r: r["batch"])
        b = [r["batch"] for r in rs]
        axes[0].plot(b, [r["in_process_us"] / 1e3 for r in rs], "o--", label=f"{ctx // 1024}k in process")
        axes[0].plot(b, [r["ipc_us"] / 1e3 for r in rs], "s-", label=f"{ctx // 1024}k through the process")
        if "in_process_per_sequence_us" in rs[0]:
            axes[0].plot(b, [r["in_process_per_sequence_us"] / 1e3 for r in rs], "x:",
                         label=f"{ctx // 1024}k in process, one sequence at a time")
        axes[1].plot(b, [r["overhead_pct"] for r in rs], "s-", label=f"{ctx // 1024}k")
        axes[2].plot(b, [r["boundary_us"] for r in rs], "s-", label=f"{ctx // 1024}k: round trip - indexer's search")
    r0 = records[0]
    axes[1].axhline(10, color="red", lw=0.8, ls=":", label="goal at batch 64: < 10%")
    axes[1].axhline(0, color="gray", lw=0.6)
    for key, label, style in (("ping_after_idle_us", "ping after 5 ms idle", "--"), ("ping_us", "ping back to back", "-."),
                              ("raw_zmq_rtt_us", "bare pyzmq round trip, 16 KB", ":")):
        if key in r0:
            axes[2].axhline(r0[key], color="gray", lw=0.9, ls=style, label=f"{label}: {r0[key]:.0f} us")
    axes[2].axhline(100, color="red", lw=0.8, ls=":", label="goal at batch 1: < 100 us")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences per query message")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("query latency, one layer (ms)")
    axes[1].set_ylabel("through the process vs in process (%)")
    axes[2].set_ylabel("socket + process boundary (us)")
    axes[2].set_ylim(bottom=0)
    fig.suptitle(f"Indexer query through the process vs in process ({r0.get('kv_heads')} KV / {r0.get('q_heads')} q heads, d=128, P=12; "
                 f"{r0.get('machine', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8k only, 2 distinct indexes, few repetitions")
    ap.add_argument("--contexts", type=int, nargs="+")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--distinct", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--depth", type=int, default=4, help="queries in flight for the sustained rate")
    ap.add_argument("--kv-heads", type=int, default=8, help="KV heads per rank (8: TP 1; 1: TP 8 of Llama-3.1-8B)")
    ap.add_argument("--name", default="indexer_latency", help="results file name")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the existing JSON")
    args = ap.parse_args(argv)
    if args.replot:
        from common import RESULTS

        name = f"{args.name}{'_quick' if args.quick else ''}"
        plot(json.loads((RESULTS / f"{name}.json").read_text()), png_path(args.name, args.quick))
        return
    contexts = args.contexts or ([8192] if args.quick else [8192, 32768])
    distinct = args.distinct or (2 if args.quick else 8)
    reps = args.reps or (5 if args.quick else 15)
    rng = np.random.default_rng(0)
    ix = Indexer.launch(num_layers=1, num_kv_heads=args.kv_heads, head_dim=D, num_slots=distinct * max(contexts),
                        index=IndexConfig(page_size=C), timeout_s=600)
    store = KeyStore.attach(ix.store.spec)
    local = IndexerService(ix.config, store)
    records = []
    try:
        ping = median_us(ix.client.ping, 200)
        ping_idle = median_us(lambda: (time.sleep(0.005), ix.client.ping()), 200) - median_us(
            lambda: time.sleep(0.005), 200)  # both processes idle for 5 ms first, as during a search
        floor = transport_floor()
        print(f"Ping round trip: {ping:.0f} us back to back, {ping_idle:.0f} us after 5 ms idle; bare transport "
              f"(16 KB): {floor}", flush=True)
        for ctx in contexts:
            records += run_context(ix, local, ctx, distinct, args.batches, reps, args.depth, rng)
    finally:
        del local
        store.close()
        ix.close()
    for r in records:
        r.update(ping_us=ping, ping_after_idle_us=ping_idle, **floor)
    path = write_records(args.name, args.quick, records)
    plot(json.loads(path.read_text()), png_path(args.name, args.quick))  # the records as written (with machine)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
