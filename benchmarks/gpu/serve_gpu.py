"""SGLang on a GPU, dense vs IceCache, through real servers: TTFT, time per output token, throughput, KV memory,
sessions admitted, and IceCache's per-step selection wait. One command on the GPU machine:

    bash benchmarks/gpu/serve_gpu.sh            # installs the carried SGLang stack, smoke-checks it, runs this
    python benchmarks/gpu/serve_gpu.py --out DIR [--modes dense,icecache-sync] [--contexts 32768,65536,130944]
        [--batches 1,8,32] [--budgets 256,1024] [--output-tokens 32] [--dense-backend triton] [--deadline-s 480]
        [--mode NAME='{"icecache config json"}' ...] [--replot]

The model is Llama-3.1-8B's configuration (32 layers, 32 query heads, 8 KV heads, head_dim 128, bf16) with
random weights (``--load-format dummy``, ``--skip-tokenizer-init``: token ids in and out), so the numbers are
the serving system's, not a model's answers. Each record (one mode, context, batch, budget) goes to
``serve_gpu.json`` as soon as it is measured, with the device and the command; ``--replot`` redraws the PNG.

Modes: ``dense`` is stock SGLang (no plugin flag, CUDA graphs on); ``icecache-sync`` is ``--enable-icecache``
as it is today (synchronous selection, every KV still in SGLang's device pool, no CUDA graphs; dense steps
while a prompt's index is built); ``icecache-wait`` the same with ``while_indexing: wait``; a later mode
is added with ``--mode NAME=JSON`` (its ``--icecache-config``, passed through as is), and its budgets are set
through ``POST /icecache/config``. A mode named ``...-graphs`` (``icecache-graphs``, ``icecache-async-graphs``,
``icecache-offload-graphs``, ...; ``dense-graphs``: stock SGLang the same way) launches with SGLang's breakable
decode CUDA graphs (``--cuda-graph-backend-decode breakable``): the layers captured around their attention,
which runs eagerly.

What each figure is:
- ``ttft_s``: request sent -> first output token, mean over the batch (all requests sent at once, so the
  batch's prefills queue behind each other: ``ttft_max_s`` is the last one's).
- ``tpot_s``: steady time per output token per request (tokens 2..n, mean); ``first_step_s``: the first
  decode step after prefill, where IceCache waits for the new index.
- ``tokens_per_s``: the batch's output tokens / its wall time, prefill included; ``decode_tokens_per_s``:
  batch / ``tpot_s``.
- ``kv_bytes_allocated``: SGLang's KV pool as allocated (dense: pool tokens x bytes per token from the
  server's ``max_total_num_tokens``; IceCache: the pool's tensors, from ``/icecache/stats``).
- ``max_sessions``: computed: requests of ``context + output`` tokens the pool holds at once (and at most
  ``max_running_requests``).
- ``selection_wait_s``: IceCache's wait for selections per decode step that selected (all anchor layers),
  measured; ``index_wait_s``: the request's steps' waits for index writes (with ``while_indexing: wait``,
  the first step waits for the prompt's index: SGLang's overlapped loop streams the first token after the
  next step has begun, so this wait lands in ``ttft_s``); ``dense_while_indexing_rows``: steps that attended
  densely because the indexer was behind (the default);
  ``load_s``: host -> device page loads per step (none yet: no offloaded pool); ``rest_s``: ``tpot_s`` minus
  the selection wait (attention, the model, the scheduler).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT))

from icecache_sglang.launch import ServerProcess  # noqa: E402

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False,
}


def kv_bytes_per_token(cfg: dict, elem: int) -> int:
    """K and V of one token over all layers, as SGLang's pool stores them."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim * elem


COVERING_BUDGET = 65600  # the check's budget above its prompt: IceCache decodes densely, outputs must equal dense's
MODEL = [LLAMA_8B, 2]  # the served model's config and KV element size (the tiny model's under --cpu-dry-run)
CHECK_CONTEXT, CHECK_TOKENS = 4000, 32


def device_name() -> str:
    try:
        import torch

        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown"


def gpu_memory_used() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return int(out[0]) * 2**20
    except Exception:  # noqa: BLE001
        return None


def write_model(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA_8B, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}))
    return path


VOCAB = [LLAMA_8B["vocab_size"]]  # the served model's (the tiny model's under --cpu-dry-run)


def prompt(seed: int, n: int) -> list[int]:
    """Distinct random token ids (no radix-cache hit between measurements)."""
    return np.random.default_rng(seed).integers(min(1000, VOCAB[0] // 4), VOCAB[0] - 2, size=n).tolist()


def stream(url: str, ids: list[int], n_out: int, timeout_s: float) -> dict:
    """One streamed /generate: token ids out and the time each count of output tokens arrived."""
    import requests

    payload = {"input_ids": ids, "stream": True,
               "sampling_params": {"max_new_tokens": n_out, "temperature": 0.0, "ignore_eos": True}}
    t0 = time.perf_counter()
    times, out_ids, finish = [], [], None
    with requests.post(url + "/generate", json=payload, stream=True, timeout=timeout_s) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line or not line.startswith(b"data:"):
                continue
            body = line[5:].strip()
            if body == b"[DONE]":
                break
            chunk = json.loads(body)
            k = chunk.get("meta_info", {}).get("completion_tokens", len(times) + 1)
            now = time.perf_counter() - t0
            while len(times) < k:
                times.append(now)
            finish = chunk.get("meta_info", {}).get("finish_reason") or finish
            got = chunk.get("output_ids")
            if got is not None:
                out_ids = got if len(got) >= len(out_ids) else out_ids + got
    if len(times) < n_out:  # e.g. prompt + max_new_tokens past the context length: SGLang ends the request early
        raise RuntimeError(f"{len(times)} of {n_out} tokens; finish_reason {finish}")
    return {"times": times, "output_ids": out_ids[-n_out:]}


def run_batch(url: str, seeds: list[int], context: int, n_out: int, timeout_s: float) -> dict:
    results: list = [None] * len(seeds)

    def one(i):
        try:
            results[i] = stream(url, prompt(seeds[i], context), n_out, timeout_s)
        except Exception as e:  # noqa: BLE001
            results[i] = {"error": f"{type(e).__name__}: {e}"}

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return {"error": errors[0], "wall_s": wall}
    ttft = [r["times"][0] for r in results]
    first = [r["times"][1] - r["times"][0] for r in results if len(r["times"]) > 1]
    steady = [(r["times"][-1] - r["times"][1]) / (len(r["times"]) - 2) for r in results if len(r["times"]) > 2]
    tpot = float(np.mean(steady)) if steady else None
    # the last quarter of each request's steps: once a long prompt's index is built, its steps are sparse
    tail = [float(np.mean(np.diff(r["times"][-max(2, len(r["times"]) // 4):]))) for r in results if len(r["times"]) > 8]
    return {"ttft_s": float(np.mean(ttft)), "ttft_max_s": float(np.max(ttft)),
            "first_step_s": float(np.mean(first)) if first else None, "tpot_s": tpot,
            "tokens_per_s": sum(len(r["times"]) for r in results) / wall, "wall_s": wall,
            "decode_tokens_per_s": len(seeds) / tpot if tpot else None,
            "output_tokens": min(len(r["times"]) for r in results),
            "tpot_last_quarter_s": float(np.mean(tail)) if tail else None,
            "token_times_s": [round(t, 4) for t in results[0]["times"]]}  # the first request's, from its send


class Records:
    def __init__(self, path: Path, command: str, device: str):
        self.path, self.command, self.device = path, command, device
        self.items = json.loads(path.read_text()) if path.exists() else []

    def add(self, rec: dict) -> None:
        rec = {**rec, "device": self.device, "command": self.command, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.items.append(rec)
        self.path.write_text(json.dumps(self.items, indent=1))
        print("RECORD", json.dumps({k: v for k, v in rec.items() if k not in ("command",)}), flush=True)


def find(d, key):
    """``key``'s value anywhere in a nested server-info reply (its layout moves between SGLang releases)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        d = list(d.values())
    if isinstance(d, list):
        for v in d:
            got = find(v, key)
            if got is not None:
                return got
    return None


#: a mode named ``...-graphs`` runs SGLang's breakable decode CUDA graphs: the layers captured around their
#: attention, which runs eagerly between the segments (IceCache's selection included)
GRAPHS_SUFFIX = "-graphs"


def server_args(cfg: dict | None, backend: str, cuda_graph_max_bs: int, cpu: bool = False,
                graphs: bool = False) -> list[str]:
    if cpu:  # --cpu-dry-run: the harness itself on a machine without a GPU (tiny model, SGLang's CPU engine)
        args = ["--skip-tokenizer-init"]
        return args if cfg is None else args + ["--enable-icecache", "--icecache-config", json.dumps(cfg)]
    args = ["--load-format", "dummy", "--skip-tokenizer-init", "--attention-backend", backend,
            "--context-length", str(LLAMA_8B["max_position_embeddings"]), "--mem-fraction-static", "0.85",
            "--max-running-requests", "32", "--sampling-backend", "pytorch", "--log-level", "info"]
    if cfg is not None and cfg.get("offload"):  # SGLang runs as many requests as the device pool has lanes
        args = [x for i, x in enumerate(args) if x != "--max-running-requests" and args[i - 1] != "--max-running-requests"]
    if graphs:  # breakable decode graphs (IceCache accepts no other kind), prefill without graphs
        args += ["--cuda-graph-backend-decode", "breakable"]
    if graphs or cfg is None:  # decode graphs on (what TPOT needs)
        args += ["--cuda-graph-max-bs-decode", str(cuda_graph_max_bs)]
    if cfg is None:  # the breakable prefill graph's 58 captured shapes take minutes
        return args + ["--disable-prefill-cuda-graph"]
    return args + ["--enable-icecache", "--icecache-config", json.dumps(cfg)]


def measure_mode(name: str, cfg: dict | None, a, rec: Records, model: Path, deadline: float,
                 reference: dict) -> None:
    log = Path(a.out) / f"server-{name}.log"
    graphs = name.endswith(GRAPHS_SUFFIX)
    srv = ServerProcess(model, server_args(cfg, a.dense_backend, max(a.batches), a.cpu_dry_run, graphs),
                        log_path=log, cpu=a.cpu_dry_run)
    base = {"mode": name, "attention_backend": a.dense_backend, "icecache_config": cfg}
    t = time.perf_counter()
    try:
        srv.start(timeout_s=max(150.0, min(600.0, deadline - time.monotonic() - 20)))
    except Exception as e:  # noqa: BLE001
        rec.add({**base, "phase": "launch", "error": f"{type(e).__name__}: {e}", "log_tail": srv.tail(60)[-4000:]})
        srv.stop()
        return
    try:
        info = srv.get("/server_info")
        pool_tokens = int(find(info, "max_total_num_tokens") or 0)
        max_running = int(find(info, "max_running_requests") or 32)
        launch = {**base, "phase": "launch", "launch_s": time.perf_counter() - t, "pool_tokens": pool_tokens,
                  "max_running_requests": max_running, "gpu_memory_used_bytes": gpu_memory_used(),
                  "cuda_graph": (graphs or cfg is None) and not a.cpu_dry_run,
                  "cuda_graph_backend": ("breakable" if graphs else "full" if cfg is None else None), "server_args": srv.args}
        if cfg is not None:
            st = srv.icecache_stats()
            launch |= {k: st.get(k) for k in ("kv_pool_bytes", "key_store_bytes", "keys_shared", "device_kv_bytes",
                                              "device_lanes", "kv_pool_host")}
        rec.add(launch)
        kv_alloc = (launch.get("kv_pool_bytes") or pool_tokens * kv_bytes_per_token(*MODEL))
        run_batch(srv.url, [1], 512, 4, 300)  # warm-up: JIT kernels, first allocation
        # outputs against dense: the same prompt, budget covering it (IceCache decodes densely), then sparse
        check = {**base, "phase": "check", "context": CHECK_CONTEXT, "output_tokens": CHECK_TOKENS}
        # offload: the device pool's lanes hold the launch budget at most, so no covering budget at runtime
        offload = bool(cfg and cfg.get("offload"))
        budgets = [None] if cfg is None else ([] if offload else [COVERING_BUDGET]) + list(a.budgets)
        rerank = int((cfg or {}).get("token_rerank", 1))
        for budget in [] if a.skip_check else budgets:
            if budget is not None:  # a covering budget decodes densely: re-ranking off for it (m x its pages
                # would pass the indexer's page limit and be refused), back on for the sparse budgets
                srv.set_icecache(budget_tokens=budget, **({"token_rerank": 1 if budget == COVERING_BUDGET else rerank}
                                                          if rerank > 1 else {}))
            got = stream(srv.url, prompt(7, CHECK_CONTEXT), CHECK_TOKENS, 300)["output_ids"]
            key = "dense" if budget is None else budget
            if budget is None:
                reference["ids"] = got
            ref = reference.get("ids")
            same = None if ref is None else sum(int(x == y) for x, y in zip(got, ref)) / max(len(ref), 1)
            rec.add({**check, "budget": budget, "output_ids": got, "matches_dense": got == ref if ref else None,
                     "agreement_with_dense": same, "what": "dense reference" if key == "dense" else
                     ("budget covers the context: must equal dense" if budget == COVERING_BUDGET else "sparse (random weights: informational)")})
        points = [(c, b, bud) for b in sorted(a.batches) for c in a.contexts
                  for bud in ([None] if cfg is None else a.budgets)]
        if cfg is not None:  # one request per context first, the costly batches last
            points.sort(key=lambda p: (p[1], p[2] != a.budgets[0], p[0]))
        seed = 1000
        for context, batch, budget in points:
            r = {**base, "phase": "serve", "context": context, "batch": batch, "budget": budget,
                 "output_tokens": a.output_tokens, "kv_bytes_allocated": kv_alloc,
                 "max_sessions": min(max_running, pool_tokens // (context + a.output_tokens)) if pool_tokens else None,
                 "load_s": None if cfg is None else 0.0}
            need = batch * (context + a.output_tokens)
            if pool_tokens and need > pool_tokens:
                rec.add({**r, "skipped": f"does not fit: {need} tokens > pool of {pool_tokens}"})
                continue
            left = deadline - time.monotonic()
            if left < a.min_point_s:
                rec.add({**r, "skipped": f"out of time ({left:.0f} s left)"})
                continue
            if budget is not None:
                srv.set_icecache(budget_tokens=budget)
                before = srv.icecache_stats(wait_s=0.6)
            seeds = list(range(seed, seed + batch))
            seed += batch
            got = run_batch(srv.url, seeds, context, a.output_tokens, timeout_s=max(30.0, left - 15))
            r |= got
            if budget is not None:
                after = srv.icecache_stats(wait_s=0.6)
                steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
                sel = after.get("selection_s_total", 0.0) - before.get("selection_s_total", 0.0)
                r |= {"decode_steps": steps, "selection_wait_s": sel / steps if steps else None,
                      "index_wait_s": after.get("write_wait_s_total", 0.0) - before.get("write_wait_s_total", 0.0),
                      "dense_while_indexing_rows": (after.get("dense_while_indexing_rows", 0)
                                                    - before.get("dense_while_indexing_rows", 0)),
                      "timed_out_steps": after.get("timed_out_steps", 0) - before.get("timed_out_steps", 0),
                      "fallbacks": after.get("fallbacks", 0) - before.get("fallbacks", 0),
                      "sparse_rows": after.get("sparse_rows", 0) - before.get("sparse_rows", 0),
                      "reused_selections": after.get("reused_selections", 0) - before.get("reused_selections", 0),
                      "reranked_selections": (after.get("reranked_selections", 0)
                                              - before.get("reranked_selections", 0)),
                      "selection_age_steps_max": after.get("selection_age_steps_max"),
                      "index_bytes": after.get("index_bytes"), "icecache_host_bytes": after.get("icecache_host_bytes"),
                      "attended_kv_bytes_last": after.get("attended_kv_bytes_last"),
                      # offload: the device's share (lanes, prefill staging) and GPU memory in use after the point
                      "device_kv_bytes": after.get("device_kv_bytes"),
                      "prefill_staging_bytes": after.get("prefill_staging_bytes"),
                      "gpu_memory_used_bytes": None if a.cpu_dry_run else gpu_memory_used()}
                if r.get("tpot_s") and r["selection_wait_s"] is not None:
                    r["rest_s"] = r["tpot_s"] - r["selection_wait_s"]
            rec.add(r)
    except Exception as e:  # noqa: BLE001
        rec.add({**base, "phase": "error", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:],
                 "log_tail": srv.tail(60)[-4000:]})
    finally:
        srv.stop()


def plot(path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = json.loads(path.read_text())
    latest = {}  # each point (mode, budget, context, batch) as last measured: records are in time order
    for r in items:
        if r.get("phase") == "serve" and r.get("tpot_s"):
            latest[(r["mode"], r.get("budget"), r["context"], r["batch"])] = r
    serve = list(latest.values())
    if not serve:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    xs = sorted({(r["batch"], r["context"]) for r in serve})  # one shared axis: (batch, context) points
    for (mode, budget), rows in sorted(_group(serve).items(), key=lambda kv: str(kv[0])):
        for ax, key in zip(axes, ("ttft_s", "tpot_s", "decode_tokens_per_s")):
            pts = sorted((xs.index((r["batch"], r["context"])), r[key]) for r in rows if r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{mode}" + ("" if budget is None else f" @{budget}"))
    for ax in axes:
        ax.set_xticks(range(len(xs)), [f"{round(c / 1024)}k x{b}" for b, c in xs], rotation=30)
    for ax, title in zip(axes, ("TTFT (s)", "time per output token (s, steady)", "decode tokens/s (batch / TPOT)")):
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    r0 = serve[0]
    devices = ", ".join(sorted({r["device"] for r in serve}))
    attempts = ", ".join(sorted({r["attempt"] for r in serve if r.get("attempt")}))
    fig.suptitle(f"SGLang 0.5.23, Llama-3.1-8B config (random weights), {devices}; "
                 f"{Path(r0['command'].split()[1] if ' ' in r0['command'] else r0['command']).name} "
                 f"(measured; each point as last measured{': ' + attempts if attempts else ''}; see serve_gpu.json)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def _group(rows):
    out = {}
    for r in rows:
        out.setdefault((r["mode"], r.get("budget")), []).append(r)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    p.add_argument("--modes", default="dense,icecache-sync")
    p.add_argument("--mode", action="append", default=[], help="NAME=JSON: an IceCache mode and its config")
    p.add_argument("--contexts", default="32768,65536,130944")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--budgets", default="256,1024")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--dense-backend", default="triton", choices=["triton", "flashinfer", "torch_native"])
    p.add_argument("--deadline-s", type=float, default=480.0, help="stop starting measurements after this")
    p.add_argument("--min-point-s", type=float, default=40.0)
    p.add_argument("--share", type=float, default=0.4, help="share of the time the dense mode may use")
    p.add_argument("--replot", action="store_true")
    p.add_argument("--skip-check", action="store_true", help="no outputs-against-dense check (a short probe)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="check the harness on this machine: the tiny test model on SGLang's CPU engine")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.replot:
        plot(out / "serve_gpu.json", out / "serve_gpu.png")
        return 0
    a.contexts = [int(x) for x in a.contexts.split(",")]
    a.batches = [int(x) for x in a.batches.split(",")]
    a.budgets = [int(x) for x in a.budgets.split(",")]
    modes = {"dense": None, "icecache-sync": {}, "icecache-wait": {"while_indexing": "wait"},
             # issue 16: queries not waited for, selections at most 4 steps old; and a synchronous refresh
             # every 4 steps
             "icecache-async": {"max_stale_steps": 4}, "icecache-every4": {"step_reuse": 4},
             # issue 14: the same with the low-rank first pass (sequences of 16384+ tokens; random weights here,
             # so its speed, not its choice of pages, is what this measures)
             "icecache-async-lowrank": {"max_stale_steps": 4, "selection": "lowrank"},
             # and with the page stage (only the codes of the pages whose summaries rank best)
             "icecache-async-lowrank-pages": {"max_stale_steps": 4, "selection": "lowrank_pages"},
             # token re-ranking among twice the pages (kept slots written into the FlashInfer plan on the device)
             "icecache-async-rerank2": {"max_stale_steps": 4, "token_rerank": 2},
             # issue 15: SGLang's KV pool pinned in host memory (host_kv_gb: half the host's free RAM), prefill
             # over rows staged to the device, decode from the device pool's lanes
             "icecache-offload": {"offload": True, "dense_layers": 0},
             "icecache-offload-async": {"offload": True, "dense_layers": 0, "max_stale_steps": 4}}
    # issue 16: the same under SGLang's breakable decode graphs (the layers captured around their attention,
    # which runs eagerly: IceCache's selection stays between the layers); dense-graphs: stock SGLang under the
    # same kind of graph, to tell the graph kind's cost from IceCache's
    modes.update({f"{m}{GRAPHS_SUFFIX}": modes[m] for m in ("dense", "icecache-sync", "icecache-async",
                                                            "icecache-offload", "icecache-offload-async")})
    # the sparse decode on IceCache's own Triton kernels (no FlashInfer host plan per anchor layer)
    modes["icecache-async-triton-graphs"] = {"max_stale_steps": 4, "decode_attention": "triton"}
    for spec in a.mode:
        name, _, text = spec.partition("=")
        modes[name] = json.loads(text or "{}")
    chosen = [m.strip() for m in a.modes.split(",") if m.strip()] + [s.partition("=")[0] for s in a.mode]
    t_end = time.monotonic() + a.deadline_s
    command = "python " + " ".join(shlex.quote(x) for x in [str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]])
    rec = Records(out / "serve_gpu.json", command, device_name())
    if a.cpu_dry_run:
        from icecache_sglang.models.tiny import ensure_tiny_model

        model, a.dense_backend = ensure_tiny_model(), "torch_native"
        MODEL[:] = [json.loads((Path(model) / "config.json").read_text()), 4]  # float32 on the CPU engine
        VOCAB[0] = MODEL[0]["vocab_size"]
    else:
        model = write_model(Path("/tmp/llama-3.1-8b-dummy"))
    reference: dict = {}
    names = list(dict.fromkeys(chosen))
    for i, name in enumerate(names):
        cfg = modes[name]
        if cfg is not None:
            cfg = {"dense_attention": a.dense_backend, **cfg}
            if cfg.get("offload"):  # the lanes must hold the largest budget measured (it cannot grow at runtime)
                cfg.setdefault("budget_tokens", max(a.budgets))
        left = t_end - time.monotonic()
        # dense (not last): its share; each IceCache mode: an even part of what is left to the modes after it
        part = a.share if (cfg is None and i < len(names) - 1) else 1.0 / (len(names) - i)
        deadline = time.monotonic() + left * part
        print(f"== {name}: {deadline - time.monotonic():.0f} s", flush=True)
        measure_mode(name, cfg, a, rec, model, deadline, reference)
    compare_checks(rec)
    try:
        plot(out / "serve_gpu.json", out / "serve_gpu.png")
    except Exception as e:  # noqa: BLE001
        print("plot:", e)
    return 0


def compare_checks(rec: Records) -> None:
    """Each IceCache check's output ids against the dense server's (whichever mode ran first)."""
    ref = next((r["output_ids"] for r in rec.items if r.get("phase") == "check" and r["mode"] == "dense"), None)
    if ref is None:
        return
    for r in rec.items:
        if r.get("phase") == "check" and r["mode"] != "dense":
            got = r["output_ids"]
            r["matches_dense"] = got == ref
            r["agreement_with_dense"] = sum(int(x == y) for x, y in zip(got, ref)) / max(len(ref), 1)
    rec.path.write_text(json.dumps(rec.items, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
