"""Sweep the tensor-core kernel's tuning knobs on the device:

    python scripts/experiments/sweep_mma.py --shapes 8192x28672,4096x4096 --Ms 1,16,32 \
        --set MBWQ_MMA_WC=1,2,4 --set MBWQ_MMA_SPLITS=0,2,4

Each --set names a knob of csrc/plan.h (Knobs; set with torch.ops.mbwq.set_knob) (0 or
unset = the built-in choice): MBWQ_MMA_WC (column warps per CTA), MBWQ_MMA_SPLITS (K splits),
MBWQ_MMA_NO_PDL (1: plain launches instead of programmatic dependent launch), MBWQ_MMA_MAX_M
(largest M on the mma.sync path, csrc/cuda/ops_cuda.cpp), MBWQ_MMA_NO_WGMMA (1: no tile kernel
on compute capability 9.0, the paths of other devices), MBWQ_GATHER_MIN_M (fewest rows for
which the x gather stages rows in shared memory, csrc/cuda/gather.cu), MBWQ_TILE_MIN_M /
MBWQ_TILE_MAX_M (the rows the many-token tile kernel takes on compute capability 9.0,
csrc/cuda/ops_cuda.cpp; a large minimum turns it off), MBWQ_TILE_TOKENS (16, 32, 64, 128 or
256 tokens per CTA tile), MBWQ_TILE_SPLITS (its K splits, csrc/cuda/gemm_tile.cu),
MBWQ_TILE_STREAM (1: its grid of tiles x K splits, 2: its stream-K schedule) and
MBWQ_MMA_CONFIG (1 + an index into csrc/plan.h's kMmaConfigs: that configuration wherever it
is valid for the row count).
--matmul adds torch.matmul in the activation dtype on the same problem, timed the same way.
Every combination is timed like scripts/bench.py (CUDA-graph replays over weight copies larger
than L2, median).
Every point is also checked against an fp32 reference (dequantized W, x * channel_scale rounded
to the activation dtype): `err` is max |y - ref| / (|ref| + |xs| @ |W|), ~1e-4 for a correct
fp16 result; a point above 2^-6 is marked WRONG and never counted as the fastest, so that a
broken variant cannot win the sweep.
Prints one line per point; the fastest correct one per (shape, format, M) is marked with *.
"""
import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import bench_matmul, clone_layer_args, read_bandwidth  # noqa: E402
from random_layers import make_layer  # noqa: E402
from timing import copies_for, time_graph  # noqa: E402

WRONG = 2.0 ** -6  # err above this is a wrong result, not rounding


class Reference:
    """fp32 reference for one layer's op arguments (docs/FORMAT.md §7)."""

    def __init__(self, args):
        qweight, scales, zeros, blocks, perm, self.cs, self.bias = args
        self.W = torch.ops.mbwq.dequant(qweight, scales, zeros, blocks, perm, torch.float32)

    def error(self, x, y):
        xs = (x * self.cs).to(x.dtype).float() if self.cs is not None else x.float()
        ref = xs @ self.W
        S = xs.abs() @ self.W.abs()
        if self.bias is not None:
            ref, S = ref + self.bias.float(), S + self.bias.float().abs()
        return ((y.float() - ref).abs() / (ref.abs() + S + 1e-30)).max().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8192x28672")
    ap.add_argument("--formats", default="q4_g128")
    ap.add_argument("--Ms", default="1,16")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                    help="activation dtype")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=v1,v2",
                    help="an environment knob and the values to try (repeatable)")
    ap.add_argument("--matmul", action="store_true", help="also time torch.matmul")
    args = ap.parse_args()
    knobs = [(k, v.split(",")) for k, v in (s.split("=", 1) for s in args.set)]
    names = [k for k, _ in knobs]
    bw = read_bandwidth(probe=False)["sum_tbs"]  # %bw against torch.sum; no probe build
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bw:.2f} TB/s")
    Ms = [int(m) for m in args.Ms.split(",")]
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        if args.matmul:
            for M, us in bench_matmul(K, N, Ms, getattr(torch, args.dtype)).items():
                print(f"{K}x{N} torch.matmul {args.dtype} M={M:<4} {us:8.1f} us", flush=True)
        for f in args.formats.split(","):
            layer, wbytes = make_layer(f, K, N)
            arg_sets = clone_layer_args(layer, copies_for(wbytes))
            ref = Reference(arg_sets[0])
            for M in Ms:
                xs = [torch.randn(M, K, device="cuda", dtype=getattr(torch, args.dtype))
                      for _ in arg_sets]
                rows = []
                for values in itertools.product(*(v for _, v in knobs)):
                    for name, value in zip(names, values):
                        torch.ops.mbwq.set_knob(name, int(value))
                    err = ref.error(xs[0], torch.ops.mbwq.gemm(xs[0], *arg_sets[0]))
                    us = time_graph([lambda x=x, a=a: torch.ops.mbwq.gemm(x, *a)
                                     for x, a in zip(xs, arg_sets)])
                    rows.append((us, err, values))
                best = min((r[0] for r in rows if r[1] <= WRONG), default=None)
                for us, err, values in rows:
                    pct = 100 * wbytes / us / 1e6 / bw
                    point = " ".join(f"{k.removeprefix('MBWQ_MMA_').lower()}={v}"
                                     for k, v in zip(names, values))
                    mark = "WRONG" if not err <= WRONG else "*" if us == best else ""
                    print(f"{K}x{N} {f} {args.dtype} M={M:<4} {point} {us:8.1f} us "
                          f"{pct:5.1f}% bw err={err:.1e} {mark}", flush=True)
            del ref, arg_sets, layer
            torch.cuda.empty_cache()
    torch.ops.mbwq.reset_knobs()


if __name__ == "__main__":
    main()
