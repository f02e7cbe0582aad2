"""Run one mbwq gemm per M on an LLM-sized layer, for a profiler to look at:

    ncu --section SpeedOfLight -k regex:mma python scripts/experiments/profile_gemm.py
    ncu -k regex:tile_gemm --launch-skip 1 -c 1 python scripts/experiments/profile_gemm.py --Ms 2048
    python scripts/experiments/profile_gemm.py --Ms 32,64 --format q2_g64 --shape 28672x8192

The layer is built on the GPU like scripts/bench.py's (scripts/random_layers.py: random codes,
formats q4_g128, q2_g64, mixed_2.5, mixed_3.0), 8192 x 28672 4-bit g128 unless --shape /
--format say otherwise; M = 1, 16 and 64 unless --Ms does. Each call is warmed up first, then
run once more for the profiler; environment knobs (MBWQ_*) apply as in the benchmarks.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from random_layers import FORMATS, make_layer, op_args  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--Ms", default="1,16,64")
    ap.add_argument("--shape", default="8192x28672", help="K x N")
    ap.add_argument("--format", choices=FORMATS, default="q4_g128")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    args = ap.parse_args()
    K, N = (int(v) for v in args.shape.split("x"))
    layer, _ = make_layer(args.format, K, N)
    a = op_args(layer)
    for M in (int(m) for m in args.Ms.split(",")):
        x = torch.randn(M, K, device="cuda", dtype=getattr(torch, args.dtype))
        torch.ops.mbwq.gemm(x, *a)
        torch.cuda.synchronize()
        torch.ops.mbwq.gemm(x, *a)
        torch.cuda.synchronize()
    print("profile_gemm: done")


if __name__ == "__main__":
    main()
