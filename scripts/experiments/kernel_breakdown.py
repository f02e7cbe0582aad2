"""Where one mbwq gemm call's time goes: the kernels it launches and their GPU durations
(torch.profiler over eager calls), against the call's time in a CUDA graph.

    python scripts/experiments/kernel_breakdown.py                       # Llama-3-8B stack shapes, M = 1
    python scripts/experiments/kernel_breakdown.py --shapes 4096x4096 --Ms 1,16,64 --format q2_g64

For each shape and M it prints the graph time per call (scripts/timing.py, weights rotated past
L2), then each kernel's median duration over the profiled eager calls and their sum. The graph
time minus that sum is what launches, dependencies and gaps between the kernels cost. A kernel
launched with programmatic dependent launch starts before the one it waits for ends, and its
duration includes that wait, so the sum can exceed the graph time.
"""
import argparse
import collections
import os
import statistics
import sys

import mbwq_ops
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import clone_layer_args  # noqa: E402
from random_layers import FORMATS, make_layer  # noqa: E402
from timing import copies_for, time_graph  # noqa: E402

STACK_SHAPES = "4096x6144,4096x4096,4096x28672,14336x4096,4096x1024"


def kernel_times(fns, calls):
    """{kernel name: [duration us]} over `calls` eager calls, cycling through fns."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(calls):
            fns[i % len(fns)]()
        torch.cuda.synchronize()
    per = collections.defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name].append(getattr(e, "device_time", None) or e.cuda_time)
    return per


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=STACK_SHAPES, help="K x N list")
    ap.add_argument("--Ms", default="1")
    ap.add_argument("--format", choices=FORMATS, default="q4_g128")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"format {args.format}, x {args.dtype}")
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        layer, wbytes = make_layer(args.format, K, N)
        rot = clone_layer_args(layer, copies_for(wbytes))
        for M in (int(m) for m in args.Ms.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            fns = [lambda r=r: torch.ops.mbwq.gemm(x, *r) for r in rot]
            graph_us = time_graph(fns)
            per = kernel_times(fns, args.calls)
            total = 0.0
            rows = []
            for name, ts in per.items():
                n = len(ts) // args.calls  # launches of this kernel per call
                med = statistics.median(ts) * max(n, 1)
                total += med
                rows.append((med, n, name))
            print(f"{K}x{N} M={M}: graph {graph_us:.2f} us/call, kernels {total:.2f} us "
                  f"(eager, weights rotated as in the graph), plan {mbwq_ops.plan(M, K, N, dtype)}")
            for med, n, name in sorted(rows, reverse=True):
                print(f"    {med:8.2f} us  x{n}  {name[:110]}")


if __name__ == "__main__":
    main()
