"""Time per output token with selections reused across decode steps (issue 16), through one real server on CPU.

One ``--enable-icecache`` server per model (budget 256, the defaults, ``selection: exact``); its modes are
switched at runtime (``POST /icecache/config``) and measured interleaved, round after round, on the same
prompt (a radix-cache hit after the first round: the prefill is not what is timed):

- ``sync``: every step selects and waits (the default); ``every{k}``: ``step_reuse: k``; ``async{k}``:
  ``max_stale_steps: k``; ``...+rerank2``: with ``token_rerank: 2``.
- ``dense``: the same server with a budget above the context, so the request decodes on SGLang's own
  attention (no selection): the floor the selection's cost is measured against. (Stock SGLang's own TPOT
  is ``serve_cpu.py``'s.)

Per record: TPOT (median of the streamed inter-token times after the first 4, the steady state), the
selection wait per step (``selection_s_total`` over ``decode_steps``), indexer queries per step, the share
of (request, layer, step) selections that were reused, the oldest one used, and fallbacks. On 2 cores the
indexer's search competes with the model for the same cores: what leaves the critical path here is the
waiting, not the work.

    python benchmarks/selection_reuse.py           # SmolLM2-135M at 2k and 4k, tiny Llama at 16k, 3 rounds
    python benchmarks/selection_reuse.py --quick   # SmolLM2 at 2k, 2 rounds
    python benchmarks/selection_reuse.py --replot
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, replot, server_benchmark_args, write_records
from serve_cpu import flush, icecache_config, kv_token_bytes, prompt_ids, stream_times

from icecache_sglang.launch import ServerProcess
from icecache_sglang.models.fetch import ensure_model
from icecache_sglang.models.tiny import ensure_tiny_model

NAME = "selection_reuse"
MODES = {"dense": {"budget_tokens": 65000}, "sync": {}, "every2": {"step_reuse": 2}, "every4": {"step_reuse": 4},
         "every8": {"step_reuse": 8}, "async1": {"max_stale_steps": 1}, "async2": {"max_stale_steps": 2},
         "async4": {"max_stale_steps": 4}, "async8": {"max_stale_steps": 8},
         # token re-ranking among twice the pages, synchronous and one step stale
         "sync+rerank2": {"token_rerank": 2}, "async1+rerank2": {"max_stale_steps": 1, "token_rerank": 2}}
SKIP = 4  # first inter-token gaps left out (the prefix hit's index share, the first selections)


def run_model(model: str, path: Path, contexts: list[int], rounds: int, max_new: int, log_dir: Path) -> list[dict]:
    _, layers = kv_token_bytes(path)
    cfg = icecache_config(layers)
    records = []
    with ServerProcess(path, ["--enable-icecache", "--icecache-config", json.dumps(cfg)],
                       log_path=log_dir / f"{NAME}-{model}.log") as srv:
        for ctx in contexts:
            ids = prompt_ids(model, path, ctx, ctx % 97)
            srv.set_icecache(budget_tokens=65000, token_rerank=1)
            stream_times(srv, ids, 4)  # the prompt's prefill, once: every measured request is a prefix hit
            for rnd in range(rounds):
                for mode, settings in MODES.items():
                    srv.set_icecache(**{"budget_tokens": cfg["budget_tokens"], "step_reuse": 1, "max_stale_steps": 0,
                                        "token_rerank": 1, **settings})
                    st0 = srv.icecache_stats(wait_s=0.3)
                    times = stream_times(srv, ids, max_new)[1]
                    st = srv.icecache_stats()
                    gaps = [b - a for a, b in zip(times, times[1:])][SKIP:]
                    steps = max(st["decode_steps"] - st0["decode_steps"], 1)
                    d = {k: st[k] - st0[k] for k in ("queries", "reused_selections", "fallbacks", "sparse_rows",
                                                      "dense_while_indexing_rows", "reranked_selections")}
                    rec = {"model": model, "context": ctx, "mode": mode, "round": rnd, "settings": settings,
                           "tpot_s": statistics.median(gaps), "tpot_mean_s": statistics.fmean(gaps),
                           "output_tokens": len(times),
                           "selection_wait_ms_per_step": 1e3 * (st["selection_s_total"] - st0["selection_s_total"]) / steps,
                           "queries_per_step": d["queries"] / steps,
                           "reused_share": d["reused_selections"] / max(d["reused_selections"] + d["queries"], 1),
                           "selection_age_steps_max": st["selection_age_steps_max"] if mode != "dense" else 0,
                           **d, "icecache_config": cfg}
                    print(json.dumps(rec), flush=True)
                    records.append(rec)
            flush(srv)
    return records


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["context"]) for r in records})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (model, ctx) in zip(axes[0], panels):
        names = list(MODES)
        med = [statistics.median([r["tpot_s"] * 1e3 for r in records
                                  if (r["model"], r["context"], r["mode"]) == (model, ctx, m)] or [float("nan")])
               for m in names]
        wait = [statistics.median([r["selection_wait_ms_per_step"] for r in records
                                   if (r["model"], r["context"], r["mode"]) == (model, ctx, m)] or [float("nan")])
                for m in names]
        ax.bar(names, med, color=["gray"] + ["C0"] * 4 + ["C1"] * 4 + ["C2"] * 2, label="TPOT (median of rounds)")
        ax.bar(names, wait, width=0.4, color="k", alpha=0.5, label="waiting for selections")
        ax.set_title(f"{model}, {ctx} tokens (measured, 2 cores)", fontsize=9)
        ax.set_ylabel("ms per output token")
        ax.tick_params(axis="x", rotation=45)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = server_benchmark_args(__doc__)
    ap.set_defaults(max_new=48)
    args = ap.parse_args(argv)
    if args.replot:
        replot(NAME, plot)
        return
    log_dir = Path(args.log_dir)
    smol = ("smollm2-135m-instruct", ensure_model("smollm2-135m-instruct"))
    if args.quick:
        plan, rounds = [(*smol, [2048])], 2
    else:
        plan, rounds = [(*smol, [2048, 4096]), ("tiny-llama", ensure_tiny_model(), [16384])], 3
    records = []
    for model, path, contexts in plan:
        records += run_model(model, path, contexts, rounds, args.max_new, log_dir)
    out = write_records(NAME, args.quick, records)
    plot(records, png_path(NAME, args.quick))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
