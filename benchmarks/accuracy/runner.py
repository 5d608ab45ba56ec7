"""Run an accuracy preset through real SGLang servers: results (one JSONL line per sample and mode,
resumable), a summary (per model, context, task, mode: accuracy with a 95% interval) and a plot."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from icecache_sglang.launch import ServerProcess
from icecache_sglang.models.fetch import ensure_model

from .modes import BASELINES, Mode, modes
from .tasks import Sample, make_samples

RESULTS = Path(__file__).resolve().parents[1] / "results"


@dataclass(frozen=True)
class Preset:
    name: str
    models: tuple[tuple[str, tuple[int, ...], int], ...]  # (model, contexts, samples per task and context)
    tasks: tuple[str, ...]
    budgets: tuple[int, ...]
    baselines: tuple[str, ...] = BASELINES
    baseline_budgets: tuple[int, ...] | None = None
    reuse: int = 0
    dense_layers: int = 2
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def modes(self) -> list[Mode]:
        return modes(self.budgets, self.baselines, self.baseline_budgets, self.reuse)


PRESETS = {
    # CI: one task, two samples, a short context, three modes
    "smoke": Preset("smoke", (("smollm2-135m-instruct", (512,), 2),), ("passkey",), (128,), ("streaming",)),
    # a 2-core CPU in under 15 minutes
    "quick": Preset("quick", (("smollm2-135m-instruct", (1024,), 8),), ("passkey",), (64, 128, 256, 512),
                    baseline_budgets=(128, 256), reuse=3),
    # GPU machines
    "full": Preset("full", (("qwen2.5-coder-0.5b-instruct", (8192, 16384, 32768), 50),), ("passkey",),
                   (64, 128, 256, 512, 1024), reuse=3),
}


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by an interrupted run
    return out


def summarize(rows: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in rows:
        if "score" in r:  # (mode lines carry the backend's counters)
            groups[(r["model"], r["context"], r["task"], r["mode"], r["budget"])].append(r["score"])
    out = []
    for (model, context, task, mode, budget), scores in sorted(groups.items(), key=lambda kv: str(kv[0])):
        k, n = sum(scores), len(scores)
        lo, hi = wilson(k, n)
        out.append({"model": model, "context": context, "task": task, "mode": mode, "budget": budget, "n": n,
                    "accuracy": k / n, "ci95_low": lo, "ci95_high": hi})
    return out


def _server_args(preset: Preset, group: tuple[int, int, int]) -> list[str]:
    sink, window, reuse = group
    cfg = {"budget_tokens": sink + window + 16, "page_size": 16, "sink_tokens": sink, "window_tokens": window,
           "dense_layers": preset.dense_layers, "layer_reuse": reuse}
    return ["--enable-icecache", "--icecache-config", json.dumps(cfg), *preset.extra_args]


def run(preset: Preset, out: Path = RESULTS, log_dir: Path | None = None, progress=print) -> Path:
    """Run ``preset``; returns the summary path (``accuracy_<preset>.json`` in ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"accuracy_{preset.name}.jsonl"
    done = {(r["model"], r["mode_label"], r["sample"]) for r in load_results(jsonl) if "sample" in r}
    all_modes = preset.modes()
    groups = defaultdict(list)
    for m in all_modes:
        groups[m.launch_group()].append(m)
    from transformers import AutoTokenizer

    with jsonl.open("a") as f:
        for model, contexts, n in preset.models:
            path = ensure_model(model)
            tok = AutoTokenizer.from_pretrained(str(path))
            samples: list[Sample] = [s for task in preset.tasks for c in contexts
                                     for s in make_samples(task, tok, c, n)]
            for group, group_modes in groups.items():
                todo = [(m, s) for m in group_modes for s in samples if (model, m.label, s.sample_id) not in done]
                if not todo:
                    continue
                log = (log_dir or out) / f"accuracy_{preset.name}_{model}_{'-'.join(map(str, group))}.log"
                with ServerProcess(path, _server_args(preset, group), log_path=log) as srv:
                    t0, count = time.monotonic(), 0
                    for mode in group_modes:
                        srv.set_icecache(**mode.settings())
                        before = srv.icecache_stats(wait_s=0)
                        for s in samples:
                            if (model, mode.label, s.sample_id) in done:
                                continue
                            r = srv.generate(input_ids=s.input_ids, max_new_tokens=s.max_new_tokens)
                            text = r.get("text", "")
                            row = {"model": model, "task": s.task, "context": s.context, "sample": s.sample_id,
                                   "mode": mode.name, "budget": mode.budget, "mode_label": mode.label,
                                   "layer_reuse": mode.layer_reuse, "score": s.score(text), "completion": text,
                                   "prompt_tokens": r.get("meta_info", {}).get("prompt_tokens"), **s.meta}
                            f.write(json.dumps(row) + "\n")
                            f.flush()
                            count += 1
                            progress(f"[{count}/{len(todo)} {time.monotonic() - t0:.0f}s] {model} {mode.label:24s} "
                                     f"{s.sample_id}: {row['score']:.0f} {text.strip()[:30]!r}")
                        # what the backend did for this mode: sparse steps, indexer queries, fallbacks
                        after = srv.icecache_stats()
                        f.write(json.dumps({"kind": "mode", "model": model, "mode_label": mode.label,
                                            "selection": after.get("selection"), "budget_tokens": after.get("budget_tokens"),
                                            **{k: after.get(k, 0) - before.get(k, 0)
                                               for k in ("sparse_rows", "queries", "fallbacks")}}) + "\n")
                        f.flush()
    rows = load_results(jsonl)
    summary = summarize(rows)
    path = out / f"accuracy_{preset.name}.json"
    meta = {"preset": preset.name, "command": "python " + " ".join(sys.argv)}
    path.write_text(json.dumps([{**r, **meta} for r in summary], indent=1))
    try:
        plot(summary, out / f"accuracy_{preset.name}.png")
    except ImportError:
        pass
    return path


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["context"], r["task"]) for r in summary})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (model, context, task) in zip(axes[0], panels):
        rows = [r for r in summary if (r["model"], r["context"], r["task"]) == (model, context, task)]
        dense = [r for r in rows if r["mode"] == "dense"]
        for name in sorted({r["mode"] for r in rows} - {"dense"}):
            rr = sorted((r for r in rows if r["mode"] == name), key=lambda r: r["budget"])
            ax.errorbar([r["budget"] for r in rr], [r["accuracy"] for r in rr],
                        yerr=[[r["accuracy"] - r["ci95_low"] for r in rr], [r["ci95_high"] - r["accuracy"] for r in rr]],
                        marker="o", capsize=3, label=name)
        if dense:
            ax.axhline(dense[0]["accuracy"], color="k", ls="--", label=f"dense ({dense[0]['n']})")
        ax.set(xscale="log", xlabel="budget (tokens)", ylabel="accuracy", ylim=(-0.05, 1.05),
               title=f"{model} {task} @ {context}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
