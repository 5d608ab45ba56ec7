"""Sessions at a fixed device KV memory: stock SGLang vs IceCache with offload, through real servers.

Both modes get the same "device" KV memory, ``DEVICE_TOKENS`` token rows of every layer and KV head:

- ``dense``: stock SGLang whose KV pool is that memory (``--max-total-tokens DEVICE_TOKENS``): a session
  decodes only while its whole KV fits in it;
- ``icecache-offload``: SGLang with ``--enable-icecache`` and ``offload: true``; that memory holds its
  prefill staging buffer (one layer of one request of the context length, ``--context-length CONTEXT_LENGTH``
  for both modes, allocated at launch: ``STAGING_TOKENS // layers`` token rows of every layer, SGLang's
  ``req_to_token`` slack included) and its device pool, the rest
  (``device_kv_tokens``: lanes of ``budget_tokens + page_size`` rows, one per decoding request); SGLang's
  own pool (``host_kv_gb``: ``HOST_TOKENS`` tokens' bytes) holds the full KV in host memory.
- ``icecache-offload-async``: the same with asynchronous selection (``max_stale_steps: 2``: a step attends
  with the freshest selection answered, at most 2 steps old; lanes of 2 more rows, the same lane count).

For each context length ``SESSIONS`` sessions (``context`` prompt tokens + ``--max-new`` new, default 256,
streamed) are
submitted at once. Recorded: ``sessions`` (the most requests SGLang ran at once, sampled from its
``sglang:num_running_reqs`` gauge), ``tokens_per_s`` (output tokens of all sessions over the wall time from
submission to the last token), median ``ttft_s`` / ``tpot_s``, and the pools' bytes: for IceCache the
sizes of the tensors it allocated (``/icecache/stats``: ``device_kv_bytes`` + ``prefill_staging_bytes``,
``kv_pool_bytes``); for stock
SGLang its pool's size as it reports it (``#tokens`` + 1 padding row x the KV bytes of a token).

On a machine without a GPU the "device" pool is a second tensor in RAM: the records show the mechanism
(how many sessions a fixed device memory keeps decoding, what moving rows costs on this machine), not a
GPU's speed. ``device`` says which.

    python benchmarks/capacity.py --max-new 256   # tiny random Llama, 2k and 8k contexts (the README's run)
    python benchmarks/capacity.py --quick    # 8k only
    python benchmarks/capacity.py --replot
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, replot, server_benchmark_args, write_records
from serve_cpu import kv_token_bytes, prompt_ids, streamed

from icecache_sglang.launch import ServerProcess
from icecache_sglang.models.tiny import ensure_tiny_model
from icecache_sglang.runtime.config import IceCacheConfig

NAME = "capacity"
ASYNC_STALE = 2  # icecache-offload-async: max_stale_steps
DEVICE_TOKENS = 10_000
HOST_TOKENS = 120_000
SESSIONS = 12
CONTEXT_LENGTH = 8192 + 512  # --context-length of both modes: the longest session (8k prompt + 256 new) fits
STAGING_TOKENS = CONTEXT_LENGTH + 64  # the staging buffer's rows: SGLang's req_to_token width (a few more, counted)
ICE = {"budget_tokens": 256, "page_size": 16, "sink_tokens": 32, "window_tokens": 32, "dense_layers": 0,
       "offload": True, "device_kv_tokens": DEVICE_TOKENS}


def running_now(srv: ServerProcess) -> int:
    text = srv.get("/metrics")["text"]
    return int(sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("sglang:num_running_reqs")))


def run_sessions(srv: ServerProcess, jobs: list[list[int]], max_new: int) -> dict:
    results: list = [None] * len(jobs)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], running_now(srv))
            except Exception:  # noqa: BLE001 - a sample missed is a sample missed
                pass
            stop.wait(0.2)

    def one(i):
        try:
            results[i] = streamed(srv, jobs[i], max_new)
        except Exception as e:  # noqa: BLE001 - recorded
            results[i] = e

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(7200)
    wall = time.perf_counter() - t0
    stop.set()
    ok = [r for r in results if isinstance(r, dict)]
    errors = [repr(r)[:200] for r in results if not isinstance(r, dict)]
    out_tokens = sum(r["output_tokens"] for r in ok)
    return {"sessions": peak[0], "sessions_submitted": len(jobs), "completed": len(ok), "errors": errors,
            "tokens_per_s": out_tokens / wall, "wall_s": wall,
            "ttft_s": statistics.median(r["ttft_s"] for r in ok) if ok else None,
            "tpot_s": statistics.median(r["tpot_s"] for r in ok) if ok else None}


def run(contexts: list[int], max_new: int, log_dir: Path) -> list[dict]:
    path = ensure_tiny_model()
    per_token, layers = kv_token_bytes(path)  # float32 K+V of one token and layer
    ice = {**ICE, "host_kv_gb": HOST_TOKENS * per_token * layers / 2**30,  # SGLang's pool: HOST_TOKENS tokens
           "device_kv_tokens": DEVICE_TOKENS - STAGING_TOKENS // layers}  # the staging buffer's share taken out
    modes = {
        "dense": ["--max-total-tokens", str(DEVICE_TOKENS), "--context-length", str(CONTEXT_LENGTH)],
        # (--max-total-tokens: above the CPU launcher's default cap, which would otherwise cut host_kv_gb's pool)
        "icecache-offload": ["--max-total-tokens", str(2 * HOST_TOKENS), "--context-length", str(CONTEXT_LENGTH),
                             "--enable-icecache", "--icecache-config", json.dumps(ice)],
        "icecache-offload-async": ["--max-total-tokens", str(2 * HOST_TOKENS), "--context-length",
                                   str(CONTEXT_LENGTH), "--enable-icecache", "--icecache-config",
                                   json.dumps({**ice, "max_stale_steps": ASYNC_STALE})],
    }
    records = []
    for mode, args in modes.items():
        with ServerProcess(path, ["--enable-metrics", *args], log_path=log_dir / f"{NAME}-{mode}.log") as srv:
            streamed(srv, prompt_ids("tiny-llama", path, 64, 1), 4)  # warm-up
            info = srv.get("/get_server_info")
            for ctx in contexts:
                jobs = [prompt_ids("tiny-llama", path, ctx, 1000 + 31 * i + ctx % 97) for i in range(SESSIONS)]
                res = run_sessions(srv, jobs, max_new)
                if mode == "dense":
                    pool = (info["max_total_num_tokens"] + 1) * per_token * layers
                    dev, host, extra = pool, 0, {}
                else:
                    st = srv.icecache_stats()
                    dev, host = st["device_kv_bytes"] + st["prefill_staging_bytes"], st["kv_pool_bytes"]
                    extra = {"device_lanes": st["device_lanes"], "max_stale_steps": st["max_stale_steps"],
                             "lane_rows": IceCacheConfig(**ICE, max_stale_steps=st["max_stale_steps"]).lane_rows,
                             "reused_selections": st.get("reused_selections"),
                             "selection_age_steps_max": st.get("selection_age_steps_max"),
                             "device_pool_bytes": st["device_kv_bytes"], "prefill_staging_bytes": st["prefill_staging_bytes"],
                             "host_kv_gb": ice["host_kv_gb"], "pool_tokens": info["max_total_num_tokens"],
                             "device_kv_bytes_loaded_total": st["device_kv_bytes_loaded_total"],
                             "device_rows_loaded": st["device_rows_loaded"], "device_rows_hit": st["device_rows_hit"],
                             "index_bytes_after": st["index_bytes"]}
                rec = {"mode": mode, "model": "tiny-llama", "context": ctx, "max_new": max_new, **res,
                       "device_kv_bytes_allocated": dev, "host_kv_bytes_allocated": host,
                       "session_kv_bytes": (ctx + max_new) * per_token * layers, "device": "cpu",
                       "device_tokens": DEVICE_TOKENS if mode == "dense" else ice["device_kv_tokens"],
                       "host_tokens": HOST_TOKENS if mode != "dense" else 0,
                       "max_running_requests": info.get("max_running_requests"), **extra}
                print(json.dumps(rec), flush=True)
                records.append(rec)
                srv.post("/flush_cache", {})
    return records


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in records})
    modes = [m for m in ("dense", "icecache-offload", "icecache-offload-async") if any(r["mode"] == m for r in records)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for j, (key, label) in enumerate([("sessions", "sessions decoding at once (peak)"),
                                      ("tokens_per_s", "output tokens/s, all sessions"),
                                      ("tpot_s", "median time per output token (s)")]):
        ax = axes[j]
        w = 0.8 / len(modes)
        for k, mode in enumerate(modes):
            ys = [next((r[key] for r in records if r["mode"] == mode and r["context"] == c), 0) or 0 for c in contexts]
            ax.bar([i + (k - (len(modes) - 1) / 2) * w for i in range(len(contexts))], ys, w, label=mode)
        ax.set_xticks(range(len(contexts)), [f"{c // 1000}k" for c in contexts])
        ax.set_xlabel("context per session (tokens)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    r0 = records[0]
    fig.suptitle(f"same device KV memory ({r0['device_tokens']} token rows per layer and KV head, "
                 f"{r0['device_kv_bytes_allocated'] / 2**20:.0f} MiB) - {r0['device']}; {r0['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = server_benchmark_args(__doc__)
    ap.set_defaults(max_new=256)  # long enough that decoding, not the prefills, decides the throughput
    args = ap.parse_args(argv)
    if args.replot:
        replot(NAME, plot)
        return
    records = run([8192] if args.quick else [2048, 8192], args.max_new, Path(args.log_dir))
    out = write_records(NAME, args.quick, records)
    plot(json.loads(out.read_text()), png_path(NAME, args.quick))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
