"""Timing helpers shared by the benchmark scripts: CUDA-graph replays timed with CUDA events,
on inputs rotated past L2."""
from __future__ import annotations

import math
import statistics

import torch

RotateBytes = 200 << 20  # > 4x the H100's 50 MB L2, > 3x the H200's 60 MB


def time_graph(fn_list, min_replays=10, target_ms=200.0) -> float:
    """Median microseconds per call of fn_list[i]() over CUDA-graph replays of all of them."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fn_list[:3] if len(fn_list) > 3 else fn_list:
            fn()
        for fn in fn_list:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fn_list:
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    replays = int(min(max(min_replays, target_ms / one), 200))
    times = []
    for _ in range(replays):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fn_list))
    del g
    return statistics.median(times)


def time_eager(fn_list, reps=5) -> float:
    for fn in fn_list:
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for fn in fn_list:
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fn_list))
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(RotateBytes / max(nbytes, 1)))
