"""What a sparse anchor layer's host path costs a decode step, on the GPU machine: a simulated step of 32
layers, no model and no indexer (``benchmarks/gpu/layer_overhead.sh``).

Each layer keeps the GPU busy for ``--layer-us`` (``torch.cuda._sleep``, calibrated) behind ``--launches``
small kernels (an eager SGLang layer launches a dozen or more); layers ``--dense-layers`` on add IceCache's
sparse path over a fixed plan of ``--tokens`` tokens per (request, KV head) (sink + selected pages + tail):
the query gathered and brought to the host, the plan's host layout copied to the device, FlashInfer's plan
and run. Variants, same process, interleaved:

* ``dense``: the layers alone (the floor);
* ``sync``: the query read back in the layer (``.cpu()``: a stall until the GPU caught up) and one FlashInfer
  wrapper (planning waits for its previous plan's copy): the code of GPU attempts 12 and 14;
* ``deferred``: the query's copy started without waiting (``runtime/host_query.py``: asynchronous selection
  sends it once it landed) and a ring of 4 wrappers (``PLAN_RING``);
* ``triton``: as ``deferred``, with IceCache's own split-KV kernels (``decode_attention: triton``,
  ``kernels/sparse_decode.py``) instead of FlashInfer: the plan's offsets copied to the device, no host plan.

The check also holds the Triton kernels to torch on the same plans. ``decode_ms`` times one layer's decode
alone (host plan + kernels, CUDA events, median of 50) for FlashInfer and Triton at a few list lengths and
batches: where the Triton kernels lose, at long lists, FlashInfer's tuned kernels should stay the default.

Before timing it checks, with the GPU held busy so the host runs ahead: FlashInfer's ring against torch over
12 distinct plans queued at once, and a ``HostQuery`` that is not ready until its copy landed.
Also timed (``row_fetch``): a decode step's start reading its requests' KV slots from SGLang's
``req_to_token`` on the device, batch 8 of 128k-token indexed requests: each whole row copied to the host in
turn (the planner before 2026-11-28), the same whole rows in one gather and one copy, and the sink and the
tail past the index in one gather and one copy (``plan.fetch_slots``).
Records: ``layer_overhead.json`` in ``$OUT`` (else ``benchmarks/results/gpu/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[2]))
from icecache_sglang.runtime.attention import (DecodePlan, FlashInferSparseDecode, TorchSparseDecode,  # noqa: E402
                                               TritonSparseDecode)
from icecache_sglang.runtime.host_query import HostQuery  # noqa: E402
from icecache_sglang.runtime.plan import fetch_slots, host_for, to_device  # noqa: E402


def sleep_cycles_per_us() -> float:
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(10_000_000)
    b.record()
    torch.cuda.synchronize()
    return 10_000_000 / (a.elapsed_time(b) * 1e3)


def check(H=8, G=4, d=128, S=8192, T=300, n_plans=12) -> dict:
    """The ring's plans are right when the host plans far ahead of the device; a query copy is not ready
    before the device reached it."""
    cyc = sleep_cycles_per_us()
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(S, H, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(S, H, d, device="cuda", dtype=torch.bfloat16, generator=g)
    plans, qs = [], []
    for i in range(n_plans):
        B = 1 + i % 3
        slots = torch.randint(0, S, (B, H, T), device="cuda", generator=g)
        valid = torch.rand(B, H, T, device="cuda", generator=g) < (0.5 + 0.04 * i)
        plans.append(DecodePlan(slots, valid))
        qs.append(torch.randn(B, H * G, d, device="cuda", dtype=torch.bfloat16, generator=g))
    fi = FlashInferSparseDecode("cuda")
    ref = [TorchSparseDecode().decode(q, k, v, p, d ** -0.5) for q, p in zip(qs, plans)]
    # planner-style plans (host indptr, device rows), so no plan reads anything back from the device
    from icecache_sglang.kernels import plan_indptr, plan_rows

    laid = []
    for p in plans:
        indptr = plan_indptr(p.valid)
        laid.append(DecodePlan(p.slots, p.valid, indptr=indptr.cpu().pin_memory(), rows=plan_rows(p.slots, p.valid, indptr)))
    fi.decode(qs[0], k, v, laid[0], d ** -0.5)  # FlashInfer's JIT build and first plan, outside the timing
    torch.cuda.synchronize()
    torch.cuda._sleep(int(200_000 * cyc))  # 200 ms: the host queues everything below first
    t = time.perf_counter()
    ring = len(fi.wrappers)
    outs = [fi.decode(q, k, v, p, d ** -0.5) for q, p in zip(qs[:ring], laid[:ring])]
    host_ms = (time.perf_counter() - t) * 1e3  # the ring's plans: none should wait for the sleeping device
    outs += [fi.decode(q, k, v, p, d ** -0.5) for q, p in zip(qs[ring:], laid[ring:])]
    torch.cuda._sleep(int(50_000 * cyc))  # 50 ms: the query below waits behind it
    hq = HostQuery(qs[-1] * 2)
    ready_early = hq.ready()
    torch.cuda.synchronize()
    err = max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, ref))
    tri = TritonSparseDecode()
    for p in laid:
        p.tokens = (p.indptr[1:] - p.indptr[:-1]).view(len(p.slots), -1)
    triton_err = max((tri.decode(q, k, v, p, d ** -0.5).float() - r.float()).abs().max().item()
                     for q, p, r in zip(qs, laid, ref))
    q_ok = np.array_equal(hq.array(), (qs[-1] * 2).view(torch.int16).cpu().numpy().view(np.uint16))
    # ring_host_ms_while_device_busy: the first ``ring`` plans and runs queued behind the 200 ms sleep; well
    # below 200 ms when planning waits for no device work (the later plans wait for the ring's copies)
    return {"ring_max_abs_err": err, "triton_max_abs_err": triton_err, "ring_plans": n_plans, "ring_host_ms_while_device_busy": host_ms,
            "host_query_ready_before_copy": ready_early, "host_query_values_equal": bool(q_ok), "ring": len(fi.wrappers)}


def row_fetch(B=8, n=131072, sink=64, tail=80, reps=30) -> dict:
    """Host ms per step to read a batch's slots from a device ``req_to_token``: whole rows one by one (as
    int64, as the planner kept them), whole rows in one gather, and sink + tail of every row in one gather
    (median of ``reps``)."""
    r2t = torch.randint(0, 1 << 30, (B + 2, n + 256), dtype=torch.int32, device="cuda")
    ranges = [r for b in range(B) for r in ((b, 0, sink), (b, n - tail, n))]
    out = {"whole_rows": [], "whole_rows_one_copy": [], "sink_and_tail": []}
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        whole = [r2t[b, :n].cpu().numpy().astype(np.int64) for b in range(B)]
        out["whole_rows"].append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        t = time.perf_counter()  # the simple alternative: the same rows in one gather and one copy
        fetch_slots(r2t, [(b, 0, n) for b in range(B)])
        out["whole_rows_one_copy"].append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        t = time.perf_counter()
        parts = fetch_slots(r2t, ranges)
        out["sink_and_tail"].append((time.perf_counter() - t) * 1e3)
    assert all(np.array_equal(parts[2 * b], whole[b][:sink]) and np.array_equal(parts[2 * b + 1], whole[b][n - tail:])
               for b in range(B))
    return {k: float(np.median(v)) for k, v in out.items()} | {"batch": B, "tokens": n}


def decode_ms(lengths=(300, 4096, 32768), batches=(1, 8), H=8, G=4, d=128, reps=50) -> list[dict]:
    """One layer's decode alone: FlashInfer (plan on the host + run) against the Triton kernels (offsets to the
    device + two launches), each (request, KV head) over ``T`` rows; CUDA-event ms per call, median."""
    out = []
    S = 65536
    k = torch.randn(S, H, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(S, H, d, device="cuda", dtype=torch.bfloat16)
    fi, tri = FlashInferSparseDecode("cuda"), TritonSparseDecode()
    for B in batches:
        for T in lengths:
            q = torch.randn(B, H * G, d, device="cuda", dtype=torch.bfloat16)
            rows = (torch.randint(0, S, (B * H * T,), device="cuda") * H).to(torch.int32)
            indptr = torch.arange(B * H + 1, dtype=torch.int32) * T
            tokens = torch.full((B, H), T)
            rec = {"batch": B, "tokens": T}
            for name, path in (("flashinfer", fi), ("triton", tri)):
                times = []
                for i in range(reps + 5):
                    plan = DecodePlan(None, None, indptr=indptr.pin_memory(), rows=rows, tokens=tokens)  # new each layer
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    a.record()
                    path.decode(q, k, v, plan, d ** -0.5)
                    b.record()
                    host = (time.perf_counter() - t) * 1e3
                    torch.cuda.synchronize()
                    if i >= 5:
                        times.append((a.elapsed_time(b), host))
                rec[f"{name}_device_ms"] = float(np.median([x[0] for x in times]))
                rec[f"{name}_host_ms"] = float(np.median([x[1] for x in times]))
            out.append(rec)
            print("decode", rec, flush=True)
    return out


def step_fn(variant: str, args, k, v, fi_sync, fi_ring, cyc, tri=None):
    B, H, G, d, T = args.batch, 8, 4, 128, args.tokens
    hidden = torch.randn(B, H * G * d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(H * G * d, H * G * d // 16, device="cuda", dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    S = k.shape[0]
    host_rows = [(rng.integers(0, S, (B * H * T,)) * H).astype(np.int32) for _ in range(args.layers)]
    indptr = (np.arange(B * H + 1) * T).astype(np.int32)
    tokens = torch.full((B, H), T)
    sleep = int(args.layer_us * cyc)
    pending = []

    def step():
        x = hidden
        for layer in range(args.layers):
            for _ in range(args.launches):
                x = x * 1.0001
            y = x[:, : 512] @ w[:512]  # a small real kernel beside the busy wait
            torch.cuda._sleep(sleep)
            if variant == "dense" or layer < args.dense_layers:
                continue
            q = x.view(B, H * G, d)
            if variant == "sync":
                q.view(torch.int16).cpu().numpy()
            else:
                pending.append(HostQuery(q))
            # the plan's host layout to the device, as plan.py does
            plan = DecodePlan(None, None, indptr=host_for(indptr.copy(), "cuda"), rows=to_device(host_rows[layer], "cuda"),
                              tokens=tokens)
            path = tri if variant == "triton" else fi_sync if variant == "sync" else fi_ring
            path.decode(q, k, v, plan, d ** -0.5)
            del y
        if pending:  # a later step sends them (the deferred queries)
            for hq in pending[: -args.layers]:
                hq.array()
            del pending[: -args.layers]
    return step


def plot(path: Path) -> None:
    """``layer_overhead.png`` beside the records (run where matplotlib is: ``--replot``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = json.loads(path.read_text())
    names = list(rec["step_ms_median"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(names, [rec["step_ms_median"][n] for n in names], color=["#888", "#c44", "#48c", "#4a4"][:len(names)])
    for i, n in enumerate(names):
        ax.text(i, rec["step_ms_median"][n], f"{rec['step_ms_median'][n]:.1f}", ha="center", va="bottom")
    ax.set_ylabel("wall ms per simulated decode step (median)")
    a = rec["args"]
    ax.set_title(f"{rec['device']}: {a['layers']} layers, {a['layers'] - a['dense_layers']} sparse, "
                 f"{a['tokens']} tokens/head, batch {a['batch']}\n(simulated step, measured; layer_overhead.py)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--replot", action="store_true", help="only redraw layer_overhead.png from --out's records")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--layer-us", type=float, default=400.0)
    ap.add_argument("--launches", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/gpu"))
    args = ap.parse_args()
    if args.replot:
        return plot(Path(args.out) / "layer_overhead.json")
    t0 = time.time()
    rec = {"check": check()}
    print("check", rec["check"], f"{time.time() - t0:.1f} s", flush=True)
    rec["row_fetch_ms"] = row_fetch()
    print("row fetch", rec["row_fetch_ms"], flush=True)
    try:  # new at stop 42 and never run on a GPU: a failure here must not cost the step timing below
        rec["decode_ms"] = decode_ms()
    except Exception as e:  # noqa: BLE001
        rec["decode_ms"] = {"error": f"{type(e).__name__}: {e}"}
        print("decode_ms failed:", rec["decode_ms"], flush=True)
    cyc = sleep_cycles_per_us()
    S = 65536
    k = torch.randn(S, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(S, 8, 128, device="cuda", dtype=torch.bfloat16)
    fi_sync, fi_ring = FlashInferSparseDecode("cuda", ring=1), FlashInferSparseDecode("cuda")
    tri = TritonSparseDecode()
    fns = {name: step_fn(name, args, k, v, fi_sync, fi_ring, cyc, tri) for name in ("dense", "sync", "deferred", "triton")}
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    for _ in range(args.steps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) * 1e3)
    rec["step_ms_median"] = {n: float(np.median(t)) for n, t in times.items()}
    rec["step_ms_p90"] = {n: float(np.percentile(t, 90)) for n, t in times.items()}
    rec |= {"args": vars(args), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "command": "python " + " ".join(sys.argv), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "what": "simulated decode step (busy-wait layers, no model, no indexer); wall ms per step, interleaved"}
    print(json.dumps(rec, indent=1), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "layer_overhead.json").write_text(json.dumps(rec, indent=1))
    try:
        plot(Path(args.out) / "layer_overhead.json")
    except ImportError:
        print("no matplotlib here: python benchmarks/gpu/layer_overhead.py --replot --out DIR draws it")


if __name__ == "__main__":
    main()
