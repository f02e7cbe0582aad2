"""Run one mbwq gemm per M on an LLM-sized layer, for a profiler to look at:

    ncu --section SpeedOfLight --section WarpStateStats -k regex:mma python scripts/profile_gemm.py
    python scripts/profile_gemm.py --Ms 32,64 --bits 2

Layer 8192 x 28672, uniform 4-bit g128 (or 2-bit g64; random codes), M = 1, 16 and 64 unless
--Ms says otherwise. Each call is warmed up first, then run once more for the profiler.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from layers import LayerSpec, make_layer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--Ms", default="1,16,64")
    ap.add_argument("--bits", type=int, choices=(2, 4), default=4)
    args = ap.parse_args()
    spec = LayerSpec(8192, 28672, False, w_bit=args.bits, group_size=128 if args.bits == 4 else 64,
                     perm="random", seed=1)
    layer, _ = make_layer(spec, "cuda")
    for M in (int(m) for m in args.Ms.split(",")):
        x = torch.randn(M, spec.in_features, device="cuda", dtype=torch.float16)
        layer(x)
        torch.cuda.synchronize()
        layer(x)
        torch.cuda.synchronize()
    print("profile_gemm: done")


if __name__ == "__main__":
    main()
