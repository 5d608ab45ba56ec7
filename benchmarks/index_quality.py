"""Index quality: attention-mass recall, recall@k and attention-output error vs token budget, for
IceCache pages and every baseline, on synthetic keys and on real Q/K captured from a real model.

Every page method runs as IceCache does: the first ``sink`` and last ``window`` tokens are always kept
(``min(32, budget/4)`` each) and the rest of the budget is spent on pages of the tokens between them.
StreamingLLM spends the whole budget on 4 sink tokens + the recent window; the token oracle picks the
budget's best tokens anywhere (an upper bound). Metrics are means over layers, query heads and decode
steps (the last ``steps`` positions of the prompt act as decode queries over the context before them).

    python benchmarks/index_quality.py --quick     # < 2 min once the model is cached
    python benchmarks/index_quality.py             # full sweep (4k-16k, budgets 64-2048)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import png_path, write_records  # noqa: E402

from icecache_sglang.index.metrics import (attention_probs, dense_output, mass_recall,  # noqa: E402
                                           output_rel_err, recall_at_k)
from icecache_sglang.index.selection import POLICIES, SinkWindowPolicy, default_sink_window  # noqa: E402
from icecache_sglang.index.synthetic import clustered_keys, lowrank_keys  # noqa: E402

METHODS = ["icecache", "oracle_token", "oracle_page", "oracle_positional", "quest", "streaming"]
RECALL_K = 64


SINK_WINDOW: tuple[int, int] | None = None  # --sink/--window override of default_sink_window


def sink_window(budget: int) -> tuple[int, int]:
    return SINK_WINDOW if SINK_WINDOW is not None else default_sink_window(budget)


def make_policy(method: str, budget: int, page_size: int, shared_index=None):
    if method == "oracle_page":
        pol = POLICIES[method](page_size=page_size, index=shared_index)
    else:
        pol = POLICIES[method](page_size=page_size)
    if method in ("streaming", "oracle_token"):
        return pol
    return SinkWindowPolicy(pol, *sink_window(budget))


def evaluate_layer(keys, values, queries, budgets, page_size, methods=METHODS):
    """{(method, budget): (mass, recall, err)} for one layer; queries [steps, H_q, d]. Each policy is built
    once per sink/window setting; oracle pages reuse IceCache's index (the same layout by construction)."""
    probs = [attention_probs(q, keys) for q in queries]
    dense = [dense_output(p, values) for p in probs]
    groups: dict[tuple, list[int]] = {}
    for b in budgets:
        groups.setdefault(sink_window(b), []).append(b)
    out = {}
    for group in groups.values():
        shared = None
        for method in methods:
            pol = make_policy(method, group[0], page_size, shared)
            pol.build(keys)
            if method == "icecache":
                shared = pol.inner.index
            for budget in group:
                m, r, e = [], [], []
                for q, p, o in zip(queries, probs, dense):
                    sel = pol.select(q, budget)
                    m.append(mass_recall(p, sel))
                    r.append(recall_at_k(p, sel, RECALL_K))
                    e.append(output_rel_err(p, values, sel, o))
                out[(method, budget)] = (float(np.mean(m)), float(np.mean(r)), float(np.mean(e)))
    return out


def synthetic_layers(kind: str, n: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    gen = clustered_keys if kind == "clustered" else lowrank_keys
    K, Q = gen(rng, n, 64, n_queries=steps, heads=2, group=4)
    V = rng.standard_normal(K.shape).astype(np.float32)
    return [(K, V, Q)]


def real_layers(model: str, text: str, n: int, steps: int):
    from transformers import AutoTokenizer

    from icecache_sglang.models.capture import capture_qkv
    from icecache_sglang.models.fetch import ensure_model
    from icecache_sglang.models.texts import essay_prompt, passkey_prompt

    tok = AutoTokenizer.from_pretrained(ensure_model(model))
    ids = essay_prompt(tok, n + steps) if text == "essays" else passkey_prompt(tok, n + steps, depth=0.5)[0]
    return [(layer.keys, layer.values, layer.queries) for layer in capture_qkv(model, ids, steps)]


def plot(records, path: Path, budget_mark=256):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = [r for r in records if r["layer"] == "mean"]
    panels = sorted({(r["source"], r["text"], r["context"]) for r in mean})
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (src, text, ctx) in zip(axes.flat, panels):
        for method in METHODS:
            pts = sorted((r["budget"], r["mass_recall"]) for r in mean
                         if (r["source"], r["text"], r["context"]) == (src, text, ctx) and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, lw=2.2 if method == "icecache" else 1.2)
        ax.axvline(budget_mark, color="grey", lw=0.5, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{src}{' ' + text if text else ''}, {ctx / 1024:.0f}k", fontsize=9)
        ax.set_xlabel("token budget")
        ax.set_ylim(0, 1.01)
    for row in axes:
        row[0].set_ylabel("attention-mass recall")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def target_table(records, budget=256) -> str:
    """The issue's targets at one budget: IceCache / oracle-page mass, and IceCache vs positional pages."""
    mean = [r for r in records if r["layer"] == "mean" and r["budget"] == budget]
    out = [f"| source | context | icecache | oracle_page | icecache / oracle_page | oracle_positional | quest | streaming |",
           "|---|---|---|---|---|---|---|---|"]
    for src, text, ctx in sorted({(r["source"], r["text"], r["context"]) for r in mean}):
        m = {r["method"]: r["mass_recall"] for r in mean if (r["source"], r["text"], r["context"]) == (src, text, ctx)}
        out.append(f"| {src}{' ' + text if text else ''} | {ctx} | {m['icecache']:.3f} | {m['oracle_page']:.3f} | "
                   f"{m['icecache'] / m['oracle_page']:.3f} | {m['oracle_positional']:.3f} | {m['quest']:.3f} | "
                   f"{m['streaming']:.3f} |")
    return "\n".join(out)


def markdown_tables(records, budgets_shown=(64, 256, 1024)) -> str:
    """Mean mass recall per method and budget, one table per source/text/context, from the records."""
    mean = [r for r in records if r["layer"] == "mean"]
    out = [f"Attention-mass recall at a 256-token budget:\n", target_table(records), ""]
    for src, text, ctx in sorted({(r["source"], r["text"], r["context"]) for r in mean}):
        rows = [r for r in mean if (r["source"], r["text"], r["context"]) == (src, text, ctx)]
        shown = [b for b in budgets_shown if any(r["budget"] == b for r in rows)]
        out.append(f"**{src}{' ' + text if text else ''}, {ctx} tokens**: mass recall (recall@{RECALL_K}, "
                   f"output error) by budget\n")
        out.append("| method | " + " | ".join(str(b) for b in shown) + " |")
        out.append("|---|" + "---|" * len(shown))
        for m in METHODS:
            cells = []
            for b in shown:
                r = next(x for x in rows if x["method"] == m and x["budget"] == b)
                cells.append(f"{r['mass_recall']:.3f} ({r['recall_at_k']:.2f}, {r['output_rel_err']:.2f})")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one context, three budgets, fewer steps")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="pinned model name or a local HF folder")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--no-real", action="store_true", help="synthetic sources only")
    ap.add_argument("--no-synthetic", action="store_true", help="real sources only")
    ap.add_argument("--contexts", type=int, nargs="+", help="override the preset's context lengths")
    ap.add_argument("--texts", nargs="+", choices=["essays", "passkey"], help="override the preset's real texts")
    ap.add_argument("--sink", type=int, help="sink tokens for every page method (default min(32, budget/4))")
    ap.add_argument("--window", type=int, help="window tokens for every page method (default min(32, budget/4))")
    ap.add_argument("--name", default="index_quality", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("--replot", metavar="JSON", help="redraw the PNG of a results file and exit")
    ap.add_argument("--table", metavar="JSON", help="print markdown tables of a results file and exit")
    args = ap.parse_args(argv)
    if args.replot or args.table:
        import json

        path = Path(args.replot or args.table)
        records = json.loads(path.read_text())
        if args.replot:
            plot(records, path.with_suffix(".png"))
        else:
            print(markdown_tables(records))
        return
    if args.quick:
        contexts, budgets, steps, texts = [4096], [64, 256, 1024], 8, ["essays"]
    else:
        contexts, budgets, steps, texts = [4096, 8192, 16384], [64, 128, 256, 512, 1024, 2048], 16, ["essays", "passkey"]
    contexts = args.contexts or contexts
    if (args.sink is None) != (args.window is None):
        ap.error("--sink and --window go together")
    global SINK_WINDOW
    SINK_WINDOW = (args.sink, args.window) if args.sink is not None else None
    budgets = [b for b in budgets if SINK_WINDOW is None or b > sum(SINK_WINDOW)]
    texts = args.texts or texts
    sources = [] if args.no_synthetic else [("synthetic-clustered", "clustered"), ("synthetic-lowrank", "lowrank")]
    if not args.no_real:
        sources += [(f"real:{args.model}", t) for t in texts]
    records = []
    t0 = time.time()
    for source, kind in sources:
        for n in contexts:
            if source.startswith("synthetic"):
                layers = synthetic_layers(kind, n, steps, seed=n)
            else:
                layers = real_layers(args.model, kind, n, steps)
            per_layer = [evaluate_layer(K, V, Q, budgets, args.page_size) for K, V, Q in layers]
            for key in per_layer[0]:
                method, budget = key
                sw = sink_window(budget)
                base = {"source": source, "text": "" if source.startswith("synthetic") else kind,
                        "sink": sw[0], "window": sw[1], "context": int(layers[0][0].shape[1]), "budget": budget,
                        "page_size": args.page_size, "method": method, "recall_k": RECALL_K,
                        "steps": steps, "n_layers": len(layers)}
                vals = np.array([pl[key] for pl in per_layer])
                records.append({**base, "layer": "mean", "mass_recall": float(vals[:, 0].mean()),
                                "recall_at_k": float(vals[:, 1].mean()), "output_rel_err": float(vals[:, 2].mean())})
                if len(layers) > 1:
                    records += [{**base, "layer": i, "mass_recall": v[0], "recall_at_k": v[1], "output_rel_err": v[2]}
                                for i, v in enumerate(vals.tolist())]
            mark = 256 if 256 in budgets else budgets[0]
            done = [r for r in records[-len(per_layer[0]) * (1 + (len(layers) > 1) * len(layers)):]
                    if r["layer"] == "mean" and r["budget"] == mark]
            summary = ", ".join(f"{r['method']} {r['mass_recall']:.3f}" for r in done)
            print(f"[{time.time() - t0:6.1f}s] {source} {kind} n={n}: mass@{mark}: {summary}", flush=True)
            write_records(args.name, args.quick, records)  # partial results survive an interrupted run
    path = write_records(args.name, args.quick, records)
    plot(records, png_path(args.name, args.quick))
    print(f"wrote {path} and {png_path(args.name, args.quick)}")


if __name__ == "__main__":
    main()
