"""Helpers shared by the benchmark scripts: machine description, result files, plots."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

#: where records and figures go (``ICECACHE_BENCH_RESULTS``: elsewhere, e.g. a GPU machine's ``$OUT``)
RESULTS = Path(os.environ.get("ICECACHE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> str:
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        mem = "?"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {mem}, {platform.system()} {platform.release()}"


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write_records(name: str, quick: bool, records: list[dict]) -> Path:
    """``benchmarks/results/<name>[_quick].json``: a list of flat records, each naming machine and command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'_quick' if quick else ''}.json"
    meta = {"machine": machine(), "command": command()}
    path.write_text(json.dumps([{**r, **meta} for r in records], indent=1))
    return path


def png_path(name: str, quick: bool) -> Path:
    return RESULTS / f"{name}{'_quick' if quick else ''}.png"


def plot_log_lines(path: Path, series, title: str, xlabel: str, ylabel: str, figsize=(5.5, 3.8),
                   title_size: int = 9) -> None:
    """One log-log figure (x in powers of two) of ``series``: ``(label, style, [(x, y), ...])`` each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    for label, style, pts in series:
        ax.plot(*zip(*sorted(pts)), style, label=label)
    ax.set_title(title, fontsize=title_size)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(name: str, plot) -> None:
    """Redraw ``<name>.png`` and ``<name>_quick.png`` from the records on disk, where they exist."""
    for quick in (False, True):
        path = RESULTS / f"{name}{'_quick' if quick else ''}.json"
        if path.exists():
            plot(json.loads(path.read_text()), png_path(name, quick))


def server_benchmark_args(doc: str):
    """The arguments the server benchmarks share (``--quick``, ``--max-new``, ``--replot``, ``--log-dir``)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--replot", action="store_true")
    ap.add_argument("--log-dir", default="/tmp")
    return ap


def add_blas_threads(ap) -> None:
    """``--blas-threads``: OpenBLAS's thread count for a benchmark of the index (default the indexer's, one;
    0: NumPy's default, every core, whose idle threads spin on the cores numba's threads need)."""
    from icecache_sglang.indexer.config import BLAS_THREADS

    ap.add_argument("--blas-threads", type=int, default=BLAS_THREADS,
                    help="OpenBLAS threads (default: the indexer's; 0: NumPy's default)")


def apply_blas_threads(n: int) -> int:
    """Set OpenBLAS to ``n`` threads (0: leave NumPy's default) -> the count it runs, for the records."""
    from icecache_sglang.indexer.blas import blas_threads, set_blas_threads

    if n:
        set_blas_threads(n)
    return max(blas_threads().values(), default=0)
