"""GPU timing helpers shared by the scripts in this folder (medians; CUDA events, graph replay, wall clock)."""

from __future__ import annotations

import time

import numpy as np
import torch


def cuda_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def graph_ms(fn, per_graph: int = 10) -> float:
    """Median milliseconds of one ``fn`` when ``per_graph`` calls are replayed from one CUDA graph: GPU time
    without Python launch gaps (how a captured decode step runs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(per_graph):
            fn()
    return cuda_ms(g.replay, reps=10) / per_graph


def wall_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median wall milliseconds of ``fn`` followed by a device synchronize (host work included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))
