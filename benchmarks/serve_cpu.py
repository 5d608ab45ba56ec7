"""Dense SGLang vs SGLang with --enable-icecache, through real servers on CPU.

For each mode (``dense``: stock torch_native attention; ``icecache``: the plugin at a 256-token budget) one
server is started; for each context length one streamed ``/generate`` request (exact token ids) measures
time to first token and time per output token; then the same prompt plus 16 new tokens (a radix-cache hit,
like a conversation's next turn) measures the prefix hit's time to first token. KV figures per request:

- ``attended_kv_bytes`` (computed from the decode plans, not allocated): KV bytes decode attention reads
  per step, all layers: the whole context for dense, sink + window + selected pages for IceCache (the
  server's ``attended_kv_bytes_last``). It is what a GPU would have to hold for the step once the full KV
  lives in host memory; here the full KV stays in SGLang's own pool for both modes (no ``offload``).
- ``kv_bytes``: the request's full K+V, in SGLang's pool for both modes.
- ``icecache_host_bytes`` (allocated): what IceCache adds in host memory for the request: its tokens' rows
  of a separate key store (0 when SGLang's pool holds the anchor keys in the store, as on CPU) plus its
  index in the indexer process (``index_bytes``, read while only this request's index is alive: each
  context ends with a ``flush_cache``).
- ``dense_while_indexing_steps`` / ``sparse_steps``: the request's decode steps (and its next turn's) that
  attended to every token while its index was being built (``while_indexing: dense``, the default) and
  those that attended sparsely; ``tpot_s`` averages both kinds.

    python benchmarks/serve_cpu.py            # tiny random Llama at 4k/16k/32k + SmolLM2 at 1k/2k/4k
    python benchmarks/serve_cpu.py --quick    # tiny at 4k/16k, under 5 minutes
    python benchmarks/serve_cpu.py --replot
"""

from __future__ import annotations

import json
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, replot, server_benchmark_args, write_records

from icecache_sglang.launch import ServerProcess
from icecache_sglang.models.fetch import ensure_model, essays_text
from icecache_sglang.models.tiny import ensure_tiny_model

NAME = "serve_cpu"
BUDGET = 256


def stream_times(srv: ServerProcess, ids: list[int], max_new: int) -> tuple[float, list[float], dict]:
    """One streamed ``/generate`` (exact token ids, greedy, ``ignore_eos``): the start time, each chunk's
    arrival time and the last chunk."""
    payload = {"input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": max_new, "temperature": 0,
                                                                      "ignore_eos": True}}
    req = urllib.request.Request(srv.url + "/generate", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times, last = [], None
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            times.append(time.perf_counter())
            last = json.loads(line[5:])
    return t0, times, last


def streamed(srv: ServerProcess, ids: list[int], max_new: int) -> dict:
    t0, times, last = stream_times(srv, ids, max_new)
    n_out = last["meta_info"]["completion_tokens"]
    ttft = times[0] - t0
    tpot = (times[-1] - times[0]) / max(len(times) - 1, 1) if n_out > 1 else float("nan")
    return {"ttft_s": ttft, "tpot_s": tpot, "output_tokens": n_out, "prompt_tokens": last["meta_info"]["prompt_tokens"]}


def flush(srv: ServerProcess, tries: int = 60) -> None:
    """``flush_cache`` (SGLang refuses it until the last request has left the scheduler)."""
    for _ in range(tries):
        try:
            srv.post("/flush_cache", {})
            return
        except urllib.error.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("flush_cache kept failing")


def prompt_ids(model: str, path: Path, n: int, seed: int) -> list[int]:
    if model == "tiny-llama":
        return random.Random(seed).choices(range(100, 40000), k=n)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(essays_text())["input_ids"]
    return ids[seed * 7: seed * 7 + n]


def kv_token_bytes(path: Path) -> tuple[int, int]:
    """(bytes of one token's K+V in one layer, layers), float32."""
    cfg = json.loads((path / "config.json").read_text())
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_key_value_heads"] * hd * 4, cfg["num_hidden_layers"]


def icecache_config(layers: int) -> dict:
    """The defaults at a 256-token budget; the paper's 2 dense layers only where they are a small share of
    the model (a 4-layer model keeps none, or half its KV would stay dense and grow with the context)."""
    return {"budget_tokens": BUDGET, "dense_layers": 2 if layers >= 16 else 0}


def run_model(model: str, path: Path, contexts: list[int], max_new: int, log_dir: Path) -> list[dict]:
    per_token, layers = kv_token_bytes(path)
    records = []
    for mode in ("dense", "icecache"):
        cfg = icecache_config(layers)
        args = [] if mode == "dense" else ["--enable-icecache", "--icecache-config", json.dumps(cfg)]
        with ServerProcess(path, args, log_path=log_dir / f"{NAME}-{model}-{mode}.log") as srv:
            streamed(srv, prompt_ids(model, path, 64, 1), 4)  # warm-up
            for ctx in contexts:
                ids = prompt_ids(model, path, ctx, ctx % 97)
                st0 = srv.icecache_stats(wait_s=0.6) if mode == "icecache" else {}
                res = streamed(srv, ids, max_new)
                # next turn: the cached prompt + 16 new tokens (stock SGLang re-runs the prefix's attention)
                res["prefix_hit_ttft_s"] = streamed(srv, ids + prompt_ids(model, path, 16, 5), 1)["ttft_s"]
                full = res["prompt_tokens"] * per_token * layers
                extra = {}
                if mode == "icecache":
                    st = srv.icecache_stats()
                    attended = st["attended_kv_bytes_last"]
                    # the key store holds every anchor layer's keys for every slot; this request's share:
                    store_per_token = st["key_store_bytes"] / (st["kv_pool_bytes"] / (per_token * layers))
                    extra = {"index_bytes": st["index_bytes"], "key_store_bytes": int(store_per_token * ctx),
                             "icecache_host_bytes": int(st["index_bytes"] + store_per_token * ctx),
                             # decode steps of this request (and its next turn) that attended densely while
                             # its index was built (while_indexing: dense, the default) and sparsely
                             "dense_while_indexing_steps": st["dense_while_indexing_rows"]
                             - st0["dense_while_indexing_rows"],
                             "sparse_steps": st["sparse_rows"] - st0["sparse_rows"]}
                else:
                    attended = full
                flush(srv)  # the next context starts with no other index alive
                rec = {"mode": mode, "model": model, "context": ctx, **res, "attended_kv_bytes": attended,
                       "kv_bytes": full, **extra, "icecache_config": cfg if mode == "icecache" else None}
                print(json.dumps(rec), flush=True)
                records.append(rec)
    return records


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(len(models), 4, figsize=(18, 3.8 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, (key, label, scale) in enumerate([("ttft_s", "time to first token (s)", 1),
                                                 ("prefix_hit_ttft_s", "prefix hit (+16 tokens): TTFT (s)", 1),
                                                 ("tpot_s", "time per output token (ms)", 1e3),
                                                 ("attended_kv_bytes", "KV attended per step (MiB, computed)",
                                                  2**-20)]):
            ax = axes[i][j]
            for mode in ("dense", "icecache"):
                rs = sorted((r for r in records if r["model"] == model and r["mode"] == mode and key in r),
                            key=lambda r: r["context"])
                ax.plot([r["context"] for r in rs], [r[key] * scale for r in rs], "o-", label=mode)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_title(f"{model}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    args = server_benchmark_args(__doc__).parse_args(argv)
    if args.replot:
        replot(NAME, plot)
        return
    log_dir = Path(args.log_dir)
    plan = [("tiny-llama", ensure_tiny_model(), [4096, 16384] if args.quick else [4096, 16384, 32768])]
    if not args.quick:
        plan.append(("smollm2-135m-instruct", ensure_model("smollm2-135m-instruct"), [1024, 2048, 4096]))
    records = []
    for model, path, contexts in plan:
        records += run_model(model, path, contexts, args.max_new, log_dir)
    out = write_records(NAME, args.quick, records)
    plot(records, png_path(NAME, args.quick))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
