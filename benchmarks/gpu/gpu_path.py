"""IceCache's GPU path on a CUDA machine: correctness checks, then timings. One command:

    bash benchmarks/gpu/run.sh            # installs carried wheels if any, then this script
    python benchmarks/gpu/gpu_path.py [--out DIR] [--quick] [--sections ...]

Needs torch + triton + a CUDA GPU, and flashinfer-python 0.7.2 for the FlashInfer parts (numba, msgspec and
pyzmq for the overlap section). Shape: Llama-3.1-8B attention (32 query heads, 8 KV heads, head_dim 128,
bfloat16), IceCache pages of 16 tokens, sink 32 + window 32.

Sections (each writes its records to ``gpu_path.json`` as soon as it ends):
- ``checks``: Triton kernels against their torch references on the GPU; FlashInfer sparse decode against a
  float32 reference on the selected tokens (partly filled pages); the offloaded layer step (both loaders,
  eager and CUDA graph) against the reference over several steps of changing selections.
- ``copy``: pinned host -> device bandwidth, one bulk copy against one copy per page.
- ``load``: page loading per step (hot-cache match + gather + copy + scatter) against the share of pages
  that changed since the previous step, per loader, as effective bandwidth.
- ``attention``: sparse decode (2k budget) against dense FlashInfer decode at 32k and 128k, batch 1-64.
- ``step``: one layer's whole IceCache decode step, eager and with CUDA graphs; overhead outside attention.
- ``overlap``: an indexer query (real indexer process over ZeroMQ) issued while the GPU computes: how much of
  its latency stays visible.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT))  # an installed icecache_sglang (with its kernels) wins

from icecache_sglang.kernels import (  # noqa: E402
    copy_rows, copy_rows_reference, plan_indptr, plan_rows, plan_rows_reference, sparse_indptr, sparse_rows,
    sparse_rows_reference)
from icecache_sglang.runtime.attention import DecodePlan, TorchSparseDecode  # noqa: E402
from icecache_sglang.runtime.offload import OffloadedDecodeLayer, StepInputs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cuda_ms, graph_ms, wall_ms  # noqa: E402

HQ, HKV, D, C = 32, 8, 128, 16
G = HQ // HKV
SINK, WINDOW = 32, 32
DT = torch.bfloat16
DEV = "cuda"


# ---------------------------------------------------------------------------------------------- selections
def random_selection(rng, B: int, P: int, context: int, tail_from: int, prev=None, change: float = 1.0):
    """Pages of C tokens inside [SINK, tail_from) per (request, KV head): ids are page numbers, slots are the
    page's token slots in request b's block ``[b*context, (b+1)*context)``; the last page of each list is
    partly filled. With ``prev``, a share ``change`` of each list is redrawn and the rest kept."""
    n_pages = (tail_from - SINK) // C
    pages = np.empty((B, HKV, P), np.int64)
    for b in range(B):
        for h in range(HKV):
            if prev is None:
                pages[b, h] = rng.choice(n_pages, P, replace=False)
            else:
                keep = prev[0][b, h].copy()
                k = int(round(change * P))
                if k:
                    fresh = np.setdiff1d(np.arange(n_pages), keep)
                    keep[rng.choice(P, k, replace=False)] = rng.choice(fresh, k, replace=False)
                pages[b, h] = keep
    slots = (np.arange(B)[:, None, None, None] * context + SINK + pages[..., None] * C
             + np.arange(C)[None, None, None, :])
    partial = np.where((pages % 3) == 0, C // 2, C)  # some pages partly filled
    slots = np.where(np.arange(C)[None, None, None, :] < partial[..., None], slots, -1)
    return pages, slots


def fixed_slots(B: int, context: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sink + unindexed tail slots (n tokens in all) per request."""
    fs = np.full((B, SINK + WINDOW + C), -1, np.int64)
    tail = n - SINK
    for b in range(B):
        fs[b, :SINK] = b * context + np.arange(SINK)
        fs[b, SINK: SINK + tail] = b * context + context - tail + np.arange(tail)
    return fs, np.full(B, n, np.int32)


def reference_out(q, host_kv, context, fs, fl, slots) -> torch.Tensor:
    """Float32 attention over exactly the planned tokens, from the host copy of the KV."""
    B = q.shape[0]
    T = fs.shape[1] + slots.shape[2] * C
    ps = np.zeros((B, HKV, T), np.int64)
    pv = np.zeros((B, HKV, T), bool)
    for b in range(B):
        for h in range(HKV):
            s = list(fs[b, : fl[b]]) + [x for x in slots[b, h].reshape(-1) if x >= 0]
            ps[b, h, : len(s)] = s
            pv[b, h, : len(s)] = True
    kv = host_kv.view(2, -1, HKV, D)
    S = B * context
    k, v = kv[0, :S].to(DEV), kv[1, :S].to(DEV)
    return TorchSparseDecode().decode(q.float(), k.float(), v.float(),
                                      DecodePlan(torch.from_numpy(ps).to(DEV), torch.from_numpy(pv).to(DEV)),
                                      D ** -0.5)


# ---------------------------------------------------------------------------------------------- sections
def section_checks(quick: bool) -> list[dict]:
    g = torch.Generator(device=DEV).manual_seed(0)
    rng = np.random.default_rng(0)
    recs = []

    def rec(name, ok, **kw):
        print(f"  check {name}: {'ok' if ok else 'FAILED'} {kw}", flush=True)
        recs.append({"section": "checks", "check": name, "ok": bool(ok), **kw})

    # copy_rows: device scatter, gather, UVA gather from pinned host memory, device row count
    src = torch.randn(2, 5000, D, device=DEV, dtype=DT, generator=g)
    dst = torch.zeros(2, 3000, D, device=DEV, dtype=DT)
    sr = torch.randint(0, 5000, (1000,), device=DEV, generator=g)
    dr = torch.randperm(3000, device=DEV, generator=g)[:1000]
    rec("copy_rows device", torch.equal(copy_rows(src, dst.clone(), sr, dr), copy_rows_reference(src, dst.clone(), sr, dr)))
    host = src.cpu().pin_memory()
    try:
        got = copy_rows(host, dst.clone(), sr, dr)
        rec("copy_rows uva (pinned host source)", torch.equal(got, copy_rows_reference(src, dst.clone(), sr, dr)))
    except Exception as e:  # noqa: BLE001
        rec("copy_rows uva (pinned host source)", False, error=repr(e))
    n = torch.tensor([377], dtype=torch.int32, device=DEV)
    rec("copy_rows device count", torch.equal(copy_rows(src, dst.clone(), None, dr, n=n, max_rows=1000),
                                              copy_rows_reference(src, dst.clone(), None, dr, n=377)))
    # index construction
    B, T = 8, 300
    slots = torch.randint(0, 10000, (B, HKV, T), device=DEV, generator=g)
    valid = torch.rand(B, HKV, T, device=DEV, generator=g) > 0.2
    ip = plan_indptr(valid)
    rec("plan_rows", torch.equal(plan_rows(slots, valid, ip).cpu(), plan_rows_reference(slots, valid).cpu()))
    P = 20
    fs = torch.randint(0, 10000, (B, 80), device=DEV, generator=g)
    fl = torch.randint(0, 81, (B,), device=DEV, generator=g).to(torch.int32)
    bl = torch.randint(-1, 500, (B, HKV, P), device=DEV, generator=g).to(torch.int32)
    fi = torch.randint(1, C + 1, (B, HKV, P), device=DEV, generator=g).to(torch.int32)
    ip = sparse_indptr(fl, bl, fi)
    rec("sparse_rows", torch.equal(sparse_rows(fs, fl, bl, fi, ip, 80000, C).cpu(),
                                   sparse_rows_reference(fs, fl, bl, fi, 80000, C)))
    # FlashInfer sparse decode over a DecodePlan against float32 on the same tokens
    from icecache_sglang.runtime.attention import FlashInferSparseDecode
    for tc in (False, True):
        att = FlashInferSparseDecode(DEV, use_tensor_cores=tc)
        for B, ctx in ((1, 4096), (16, 8192)):
            k = torch.randn(B * ctx, HKV, D, device=DEV, dtype=DT, generator=g)
            v = torch.randn(B * ctx, HKV, D, device=DEV, dtype=DT, generator=g)
            q = torch.randn(B, HQ, D, device=DEV, dtype=DT, generator=g)
            T = 2048
            sl = (torch.arange(B, device=DEV).view(B, 1, 1) * ctx
                  + torch.randint(0, ctx, (B, HKV, T), device=DEV, generator=g))
            va = torch.rand(B, HKV, T, device=DEV, generator=g) > 0.1  # ragged: token-level, pages partly filled
            plan = DecodePlan(sl, va)
            out = att.decode(q, k, v, plan, D ** -0.5).float()
            ref = TorchSparseDecode().decode(q.float(), k.float(), v.float(), plan, D ** -0.5)
            err = float((out - ref).abs().max())
            rec(f"flashinfer sparse decode tc={tc} B={B}", err < 2e-2, max_abs_err=err)
    # the offloaded layer step: both loaders, eager and graph, several steps
    for mode in ("bulk", "uva"):
        B, ctx, P = 4, 4096, 24
        host_kv = torch.randn(2, B * ctx * HKV, D, dtype=DT).pin_memory()
        layer = OffloadedDecodeLayer(max_batch=8, n_kv_heads=HKV, group=G, head_dim=D, page_size=C, max_pages=P,
                                     max_fixed=SINK + WINDOW + C, pool_slots=B * ctx, cache_blocks=P + 8,
                                     n_req_rows=8, dtype=DT, device=DEV, loader_mode=mode)
        layer.pool.copy_(host_kv.view(2, B * ctx, HKV, D))  # sink/tail live in the device pool
        fs, fl = fixed_slots(B, ctx, SINK + 40)
        sel = None
        for step in range(6):
            sel = random_selection(rng, B, P, ctx, ctx - 40, prev=sel, change=0.3 if step else 1.0)
            q = torch.randn(B, HQ, D, device=DEV, dtype=DT, generator=g)
            inp = StepInputs(np.arange(B), fs, fl, sel[0], sel[1])
            ref = reference_out(q, host_kv, ctx, fs, fl, sel[1])
            graph = step >= 3
            out = layer.step(q, inp, host_kv, graph=graph).float()
            err = float((out - ref).abs().max())
            rec(f"offloaded step {mode} step={step} graph={graph}", err < 2e-2, max_abs_err=err,
                hits=layer.last_stats.pages_hit, misses=layer.last_stats.pages_missed)
    return recs


def section_copy(quick: bool) -> list[dict]:
    recs = []
    page_bytes = C * D * 2  # one head's keys of one page, bf16
    for total_mb in ([1, 16, 64] if quick else [0.25, 1, 4, 16, 64, 256]):
        nbytes = int(total_mb * 2**20)
        host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dev = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
        bulk = cuda_ms(lambda: dev.copy_(host, non_blocking=True))
        n_pages = nbytes // page_bytes
        hv, dv = host.view(n_pages, page_bytes), dev.view(n_pages, page_bytes)
        per_page = None
        if n_pages <= 16384:
            def pages():
                for i in range(n_pages):
                    dv[i].copy_(hv[i], non_blocking=True)
            per_page = cuda_ms(pages, reps=5, warmup=1)
        r = {"section": "copy", "bytes": nbytes, "bulk_ms": bulk, "bulk_GBps": nbytes / bulk / 1e6,
             "page_bytes": page_bytes, "per_page_ms": per_page,
             "per_page_GBps": nbytes / per_page / 1e6 if per_page else None}
        print(f"  copy {total_mb:7.2f} MiB: bulk {r['bulk_GBps']:.1f} GB/s, per page "
              f"{r['per_page_GBps'] or float('nan'):.2f} GB/s", flush=True)
        recs.append(r)
    return recs


def section_load(quick: bool, pinned_GBps: float | None) -> list[dict]:
    """Per step and layer: hot-cache matching (host), then loading the missed rows (gather + copy + scatter,
    or the UVA kernel), timed apart, and a plain pinned copy of the same bytes for comparison."""
    from icecache_sglang.runtime.offload.loader import _gather, _np_view

    rng = np.random.default_rng(1)
    recs = []
    ctx = 8192  # the host pool only has to hold the selected pages; loading cost does not depend on it
    for B in ([1, 16] if quick else [1, 16, 64]):
        host_kv = torch.empty(2, B * ctx * HKV, D, dtype=DT, pin_memory=True)
        host_kv.view(torch.int16).random_(-2000, 2000)
        for budget in ([256, 2048] if quick else [256, 1024, 2048]):
            P = (budget - SINK - WINDOW) // C
            changes = [0.0, 0.25, 1.0] if quick else [0.0, 0.1, 0.25, 0.5, 1.0]
            sels = {}
            for change in changes:
                seq = [random_selection(rng, B, P, ctx, ctx - WINDOW)]
                for _ in range(8):
                    seq.append(random_selection(rng, B, P, ctx, ctx - WINDOW, prev=seq[-1], change=change))
                sels[change] = seq
            for mode in ("bulk", "uva"):
                layer = OffloadedDecodeLayer(max_batch=B, n_kv_heads=HKV, group=G, head_dim=D, page_size=C,
                                             max_pages=P, max_fixed=SINK + WINDOW + C, pool_slots=B * ctx,
                                             cache_blocks=P, n_req_rows=B, dtype=DT, device=DEV, loader_mode=mode)
                lanes, heads = layer.map.lanes(np.arange(B))
                for change in changes:
                    seq = sels[change]
                    # the matching alone, over the sequence of selections
                    assign_t, assigned = [], []
                    for _ in range(3):
                        layer.map.reset()
                        for pg, sl in seq:
                            t = time.perf_counter()
                            a = layer.map.assign(lanes, heads, pg.reshape(B * HKV, P), sl.reshape(B * HKV, P, C))
                            assign_t.append((time.perf_counter() - t) * 1e3)
                            assigned.append(a)  # kept apart from the loader's buffers: replayed below
                    steady = [a for k, a in enumerate(assigned) if k % len(seq)]  # not the cold first step
                    # the loader as a step uses it: the match wrote the rows into its pinned index buffers
                    src_buf, dst_buf = layer.loader.row_buffers()
                    times = []
                    for k, a in enumerate(steady * 2):
                        n_rows = len(a.src_rows)
                        src_buf[:n_rows], dst_buf[:n_rows] = a.src_rows, a.dst_rows  # (the match's output)
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        layer.loader.load(host_kv, layer.kv, src_buf[:n_rows], dst_buf[:n_rows], a.max_src_row)
                        torch.cuda.synchronize()
                        if k >= 3:
                            times.append((time.perf_counter() - t) * 1e3)
                    ms = float(np.median(times))
                    rows = float(np.median([len(a.src_rows) for a in steady]))
                    nbytes = int(rows * 2 * D * 2)
                    copy_ms = None
                    if nbytes:
                        src = host_kv.view(-1)[: nbytes // 2]
                        dst = torch.empty(nbytes // 2, dtype=DT, device=DEV)
                        copy_ms = cuda_ms(lambda: dst.copy_(src, non_blocking=True))
                    r = {"section": "load", "mode": mode, "batch": B, "budget": budget, "pages": P,
                         "change": change, "rows_moved": rows, "bytes": nbytes,
                         "assign_ms": float(np.median(assign_t)), "ms": ms,
                         "GBps": nbytes / ms / 1e6 if ms > 0 else None, "plain_copy_ms": copy_ms,
                         "plain_copy_GBps": nbytes / copy_ms / 1e6 if copy_ms else None,
                         "pct_of_plain_copy": 100 * copy_ms / ms if copy_ms else None,
                         "pct_of_peak_pinned": (100 * nbytes / ms / 1e6 / pinned_GBps) if pinned_GBps and ms > 0 else None}
                    print(f"  load {mode:4s} B={B:2d} budget={budget:4d} change={change:.2f}: match "
                          f"{r['assign_ms']:.3f} ms, load {ms:.3f} ms, {rows:.0f} rows ({r['GBps'] or 0:.1f} GB/s; "
                          f"plain copy {r['plain_copy_GBps'] or 0:.1f} GB/s -> {r['pct_of_plain_copy'] or 0:.0f}%)",
                          flush=True)
                    recs.append(r)
                del layer
        # the parts of loading every row of the largest budget: host gather (numba / torch), kernel launches
        n = B * HKV * ((2048 - SINK - WINDOW) // C) * C
        src_rows = rng.integers(0, B * ctx * HKV, n)
        stage = torch.empty(n, 2, D, dtype=DT, pin_memory=True)
        ms_numba = wall_ms(lambda: _gather(_np_view(host_kv), src_rows, _np_view(stage)), reps=10)
        idx = torch.from_numpy(src_rows)
        out_t = torch.empty(2, n, D, dtype=DT, pin_memory=True)
        ms_torch = wall_ms(lambda: torch.index_select(host_kv, 1, idx, out=out_t), reps=10)
        dev_kv = torch.empty(2, n, D, dtype=DT, device=DEV)
        sr, dr = idx.to(DEV), torch.arange(n, device=DEV)
        uva = {}
        for br in (8, 16, 32, 64):
            for nw in (2, 4, 8):
                uva[f"r{br}w{nw}"] = cuda_ms(lambda: copy_rows(host_kv, dev_kv, sr, dr, block_rows=br, num_warps=nw),
                                             reps=10)
        staged = torch.empty(2, n, D, dtype=DT, device=DEV)
        scatter_ms = cuda_ms(lambda: copy_rows(staged, dev_kv, None, dr), reps=10)
        nbytes = n * 2 * D * 2
        r = {"section": "load_parts", "batch": B, "rows": n, "bytes": nbytes, "gather_numba_ms": ms_numba,
             "gather_torch_ms": ms_torch, "scatter_ms": scatter_ms,
             **{f"uva_{k}_ms": v for k, v in uva.items()}, "uva_best": min(uva, key=uva.get),
             "uva_best_GBps": nbytes / min(uva.values()) / 1e6, "gather_numba_GBps": nbytes / ms_numba / 1e6}
        print(f"  load parts B={B} ({nbytes / 2**20:.1f} MiB): gather numba {ms_numba:.3f} ms, torch {ms_torch:.3f} ms,"
              f" scatter {scatter_ms:.3f} ms, uva {uva}", flush=True)
        recs.append(r)
        del host_kv, stage, out_t, dev_kv, staged
        torch.cuda.empty_cache()
    return recs


def section_attention(quick: bool) -> list[dict]:
    import flashinfer

    from icecache_sglang.runtime.attention import GraphDecodeBuffers
    from icecache_sglang.runtime.attention.flashinfer import WORKSPACE_BYTES
    recs = []
    g = torch.Generator(device=DEV).manual_seed(2)
    ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEV)
    budget = 2048
    for ctx in ([32768, 131072]):
        for B in ([1, 16] if quick else [1, 4, 16, 64]):
            S = B * ctx
            k = torch.empty(S, HKV, D, device=DEV, dtype=DT).normal_(generator=g)
            v = torch.empty(S, HKV, D, device=DEV, dtype=DT).normal_(generator=g)
            q = torch.randn(B, HQ, D, device=DEV, dtype=DT, generator=g)
            out = {}
            # dense, as SGLang's flashinfer backend plans decode: page size 1, one index per token
            indptr = torch.arange(B + 1, dtype=torch.int32, device=DEV) * ctx
            indices = torch.arange(S, dtype=torch.int32, device=DEV)
            last = torch.ones(B, dtype=torch.int32, device=DEV)
            for tc in (False, True):
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    ws, "NHD", use_cuda_graph=True, use_tensor_cores=tc, paged_kv_indptr_buffer=indptr.clone(),
                    paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last.clone())
                w.plan(indptr.cpu(), indices, last, num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=1,
                       q_data_type=DT, kv_data_type=DT)
                od = torch.empty_like(q)
                out[f"dense_tc{int(tc)}"] = graph_ms(lambda: w.run(q, (k.view(-1, 1, HKV, D), v.view(-1, 1, HKV, D)),
                                                                   out=od))
            # sparse: budget tokens per (request, KV head), token-level rows slot*H + h
            bufs = {}
            for tc in (False, True):
                gb = GraphDecodeBuffers(B, HKV, budget, DEV, ws, use_tensor_cores=tc)
                rows = ((torch.arange(B, device=DEV).view(B, 1, 1) * ctx
                         + torch.randint(0, ctx, (B, HKV, budget), device=DEV, generator=g)) * HKV
                        + torch.arange(HKV, device=DEV).view(1, HKV, 1)).to(torch.int32)
                gb.indices.copy_(rows.view(-1))
                gb.plan(np.arange(B * HKV + 1, dtype=np.int32) * budget, G, D, DT, DT, D ** -0.5)
                o = torch.empty(B, HQ, D, device=DEV, dtype=DT)
                out[f"sparse_tc{int(tc)}"] = graph_ms(lambda: gb.run(q, k, v, o))
                bufs[tc] = gb
            dense, sparse = min(out["dense_tc0"], out["dense_tc1"]), min(out["sparse_tc0"], out["sparse_tc1"])
            r = {"section": "attention", "context": ctx, "batch": B, "budget": budget, **{f"{k_}_ms": v_ for k_, v_ in out.items()},
                 "dense_ms": dense, "sparse_ms": sparse, "speedup": dense / sparse}
            print(f"  attention ctx={ctx} B={B}: dense {dense:.3f} ms, sparse {sparse:.3f} ms, "
                  f"x{r['speedup']:.1f}  {out}", flush=True)
            recs.append(r)
            del k, v, bufs
            torch.cuda.empty_cache()
    return recs


def section_step(quick: bool) -> list[dict]:
    rng = np.random.default_rng(3)
    g = torch.Generator(device=DEV).manual_seed(3)
    recs = []
    ctx = 8192  # as in section_load
    for B in ([1, 16] if quick else [1, 4, 16, 64]):
        host_kv = torch.empty(2, B * ctx * HKV, D, dtype=DT, pin_memory=True)
        host_kv.view(torch.int16).random_(-2000, 2000)
        for budget in (256, 2048):
            P = (budget - SINK - WINDOW) // C
            for mode in ("bulk", "uva"):
                layer = OffloadedDecodeLayer(max_batch=B, n_kv_heads=HKV, group=G, head_dim=D, page_size=C,
                                             max_pages=P, max_fixed=SINK + WINDOW + C, pool_slots=B * ctx,
                                             cache_blocks=P + P // 2, n_req_rows=B, dtype=DT, device=DEV,
                                             loader_mode=mode)
                fs, fl = fixed_slots(B, ctx, SINK + WINDOW)
                q = torch.randn(B, HQ, D, device=DEV, dtype=DT, generator=g)
                sels = [random_selection(rng, B, P, ctx, ctx - WINDOW)]
                for _ in range(30):
                    sels.append(random_selection(rng, B, P, ctx, ctx - WINDOW, prev=sels[-1], change=0.25))
                res = {}
                for graph in (False, True):
                    it = iter(sels * 3)

                    def step():
                        pg, sl = next(it)
                        layer.step(q, StepInputs(np.arange(B), fs, fl, pg, sl), host_kv, graph=graph)
                    res[graph] = wall_ms(step, reps=25, warmup=4)
                it = iter(sels * 3)

                def prepare():
                    pg, sl = next(it)
                    layer.prepare(StepInputs(np.arange(B), fs, fl, pg, sl), host_kv)
                prep = wall_ms(prepare, reps=25, warmup=4)
                bufs = layer._bufs(B)
                attn = graph_ms(lambda: bufs.run(layer.q[:B], layer.kv[0], layer.kv[1], layer.out[:B]))
                r = {"section": "step", "mode": mode, "batch": B, "budget": budget, "change": 0.25,
                     "eager_ms": res[False], "graph_ms": res[True], "attention_ms": attn, "host_prepare_ms": prep,
                     "overhead_eager_ms": res[False] - attn, "overhead_graph_ms": res[True] - attn}
                print(f"  step {mode:4s} B={B:2d} budget={budget}: eager {res[False]:.3f} ms, graph {res[True]:.3f} ms,"
                      f" host part {prep:.3f} ms, attention {attn:.3f} ms", flush=True)
                recs.append(r)
                del layer
            torch.cuda.empty_cache()
        del host_kv
    return recs


def section_overlap(quick: bool) -> list[dict]:
    """One query message per anchor layer (P pages for B sequences x 8 KV heads, 32 query heads) to a real
    indexer over a ``ctx``-token index, against GPU work of about one layer's share of a decode step. Serial:
    query, wait, then compute. Overlapped: the query is sent, the GPU computes, then the answer is awaited
    (selection for the next step from this step's queries)."""
    from icecache_sglang.index.config import IndexConfig
    from icecache_sglang.index.synthetic import lowrank_keys
    from icecache_sglang.indexer import Indexer

    rng = np.random.default_rng(4)
    recs = []
    ctx = 8192 if quick else 32768
    P = (2048 - SINK - WINDOW) // C
    threads = max(1, (os.cpu_count() or 2) - 2)  # the scheduler's own thread and ZeroMQ's keep a core each
    ix = Indexer.launch(num_layers=1, num_kv_heads=HKV, head_dim=D, num_slots=ctx, index=IndexConfig(page_size=C),
                        timeout_s=600, threads=threads)
    try:
        c = ix.client
        K, Q = lowrank_keys(rng, ctx, D, heads=HKV, group=G, n_queries=64)
        slots = np.arange(ctx, dtype=np.int64)
        ix.store.keys[0, slots] = K.transpose(1, 0, 2)
        t = time.perf_counter()
        c.build(0, [0], slots)
        c.sync(timeout_s=3600)
        print(f"  overlap: {ctx}-token index built in {time.perf_counter() - t:.1f} s", flush=True)
        a = torch.randn(4096, 4096, device=DEV, dtype=DT)
        for B in ([1, 16] if quick else [1, 8, 32]):
            for j in range(B):
                c.share(0, 1 + j, ctx)
            c.sync()
            seqs = [1 + j for j in range(B)]
            qs = [np.stack([Q[(k + j) % len(Q)] for j in range(B)]).astype(np.float32) for k in range(8)]
            query_ms = wall_ms(lambda: c.query(0, seqs, qs[0], P, timeout_s=60), reps=10, warmup=2)
            for gpu_target in (0.25, 1.0, 4.0):  # ms of GPU work the query can hide behind
                reps_mm = max(1, int(gpu_target / max(cuda_ms(lambda: a @ a, reps=5), 1e-3)))

                def gpu():
                    for _ in range(reps_mm):
                        a @ a
                gpu_ms = wall_ms(gpu, reps=10)

                def serial():
                    c.query(0, seqs, qs[1], P, timeout_s=60)
                    gpu()

                def overlapped():
                    rid = c.query_async(0, seqs, qs[2], P)
                    gpu()
                    torch.cuda.synchronize()
                    c.query_result(rid, 60)
                s_ms, o_ms = wall_ms(serial, reps=10), wall_ms(overlapped, reps=10)
                r = {"section": "overlap", "batch": B, "context": ctx, "pages": P, "indexer_threads": threads,
                     "query_ms": query_ms,
                     "gpu_ms": gpu_ms, "serial_ms": s_ms, "overlapped_ms": o_ms,
                     "visible_ms": max(0.0, o_ms - gpu_ms), "visible_pct": 100 * max(0.0, o_ms - gpu_ms) / query_ms}
                print(f"  overlap B={B} gpu={gpu_ms:.2f} ms: query {query_ms:.2f} ms, serial {s_ms:.2f}, "
                      f"overlapped {o_ms:.2f} -> visible {r['visible_ms']:.2f} ms", flush=True)
                recs.append(r)
            c.release(seqs)
            c.sync()
    finally:
        ix.close()
    return recs


# ---------------------------------------------------------------------------------------------- plots
def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(18, 10))
    dev = next((r.get("device") for r in records if r.get("device")), "GPU")
    cp = [r for r in records if r["section"] == "copy"]
    if cp:
        x = [r["bytes"] / 2**20 for r in cp]
        ax[0, 0].plot(x, [r["bulk_GBps"] for r in cp], "o-", label="one bulk copy")
        ax[0, 0].plot(x, [r["per_page_GBps"] or np.nan for r in cp], "s-", label=f"one copy per {cp[0]['page_bytes']} B page")
        ax[0, 0].set(xscale="log", xlabel="MiB moved", ylabel="GB/s", title="pinned host -> device")
        ax[0, 0].legend()
    ld = [r for r in records if r["section"] == "load" and r["budget"] == 2048]
    for mode in ("bulk", "uva"):
        for B in sorted({r["batch"] for r in ld}):
            rr = [r for r in ld if r["mode"] == mode and r["batch"] == B]
            ax[0, 1].plot([r["change"] for r in rr], [r["ms"] for r in rr], "o-" if mode == "bulk" else "x--",
                          label=f"{mode} B={B}")
    ax[0, 1].set(xlabel="share of pages changed since last step", ylabel="ms per layer",
                 title="page loading per step (2k budget)")
    ax[0, 1].legend(fontsize=7)
    full = [r for r in records if r["section"] == "load" and r["change"] == 1.0]
    for mode in ("bulk", "uva"):
        for B in sorted({r["batch"] for r in full}):
            rr = [r for r in full if r["mode"] == mode and r["batch"] == B]
            ax[0, 2].plot([r["budget"] for r in rr], [r["pct_of_plain_copy"] or np.nan for r in rr],
                          "o-" if mode == "bulk" else "x--", label=f"{mode} B={B}")
    ax[0, 2].axhline(80, color="k", lw=0.8, ls=":")
    ax[0, 2].set(xscale="log", xlabel="budget (tokens)", ylabel="% of a plain pinned copy of the same bytes",
                 title="loading every page: bandwidth against a plain copy")
    ax[0, 2].legend(fontsize=7)
    at = [r for r in records if r["section"] == "attention"]
    for ctx in sorted({r["context"] for r in at}):
        rr = [r for r in at if r["context"] == ctx]
        ax[1, 0].plot([r["batch"] for r in rr], [r["dense_ms"] for r in rr], "o-", label=f"dense {ctx // 1024}k")
        ax[1, 0].plot([r["batch"] for r in rr], [r["sparse_ms"] for r in rr], "s--", label=f"sparse 2k of {ctx // 1024}k")
    ax[1, 0].set(xscale="log", yscale="log", xlabel="batch", ylabel="ms", title="decode attention, one layer")
    ax[1, 0].legend(fontsize=7)
    st = [r for r in records if r["section"] == "step"]
    labels = [f"{r['mode']} B={r['batch']} {r['budget']}" for r in st]
    xs = np.arange(len(st))
    ax[1, 1].bar(xs - 0.3, [r["eager_ms"] for r in st], 0.3, label="eager")
    ax[1, 1].bar(xs, [r["graph_ms"] for r in st], 0.3, label="CUDA graph")
    ax[1, 1].bar(xs + 0.3, [r["attention_ms"] for r in st], 0.3, label="attention alone")
    ax[1, 1].set_xticks(xs, labels, rotation=70, fontsize=6)
    ax[1, 1].set(ylabel="ms", title="one layer's IceCache decode step (25% pages changed)")
    ax[1, 1].legend(fontsize=7)
    ov = [r for r in records if r["section"] == "overlap"]
    for B in sorted({r["batch"] for r in ov}):
        rr = [r for r in ov if r["batch"] == B]
        ax[1, 2].plot([r["gpu_ms"] for r in rr], [r["visible_ms"] for r in rr], "o-", label=f"visible, B={B}")
        ax[1, 2].plot([r["gpu_ms"] for r in rr], [r["query_ms"] for r in rr], "k:", lw=0.8)
    ax[1, 2].set(xlabel="GPU work the query overlaps (ms)", ylabel="ms", title="selection latency still visible")
    ax[1, 2].legend(fontsize=7)
    fig.suptitle(f"IceCache GPU path on {dev}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", nargs="+", default=["checks", "copy", "load", "attention", "step", "overlap"])
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON in --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_path" + ("_quick" if args.quick else "")
    jpath, ppath = out / f"{name}.json", out / f"{name}.png"
    if args.replot:
        plot(json.loads(jpath.read_text()), ppath)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to run")
        return 2
    try:
        import flashinfer
        fi_version = flashinfer.__version__
    except Exception as e:  # noqa: BLE001
        fi_version = f"unavailable ({e!r})"
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "flashinfer": fi_version, "host": platform.node(),
            "cpus": os.cpu_count(), "command": "python benchmarks/gpu/gpu_path.py " + " ".join(argv or sys.argv[1:])}
    print(meta, flush=True)
    records: list[dict] = []
    failed = []
    pinned = None
    for sec in args.sections:
        t = time.perf_counter()
        print(f"== {sec}", flush=True)
        try:
            if sec == "checks":
                got = section_checks(args.quick)
                failed += [r["check"] for r in got if not r["ok"]]
            elif sec == "copy":
                got = section_copy(args.quick)
                pinned = max(r["bulk_GBps"] for r in got)
            elif sec == "load":
                got = section_load(args.quick, pinned)
            elif sec == "attention":
                got = section_attention(args.quick)
            elif sec == "step":
                got = section_step(args.quick)
            elif sec == "overlap":
                got = section_overlap(args.quick)
            else:
                raise ValueError(f"unknown section {sec}")
        except Exception as e:  # noqa: BLE001 - record and go on to the next section
            traceback.print_exc()
            got = [{"section": sec, "error": repr(e)}]
            failed.append(sec)
        print(f"== {sec}: {time.perf_counter() - t:.1f} s", flush=True)
        records += [{**r, **meta} for r in got]
        jpath.write_text(json.dumps(records, indent=1))
    try:
        plot([r for r in records if "error" not in r], ppath)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    print(f"wrote {jpath}; failed: {failed or 'nothing'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
