"""Run one mbwq gemm per path on an LLM-sized layer, for a profiler to look at:

    ncu --section SpeedOfLight --section WarpStateStats -k regex:mma python scripts/profile_gemm.py

Layer 8192 x 28672, uniform 4-bit g128 (random codes); M = 1, 16 (tensor-core kernel) and 64
(dequant + cuBLAS). Each call is warmed up first, then run once more for the profiler.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from layers import LayerSpec, make_layer  # noqa: E402


def main():
    spec = LayerSpec(8192, 28672, False, w_bit=4, group_size=128, perm="random", seed=1)
    layer, _ = make_layer(spec, "cuda")
    for M in (1, 16, 64):
        x = torch.randn(M, spec.in_features, device="cuda", dtype=torch.float16)
        layer(x)
        torch.cuda.synchronize()
        layer(x)
        torch.cuda.synchronize()
    print("profile_gemm: done")


if __name__ == "__main__":
    main()
