"""Sweep the tensor-core kernel's launch knobs (column warps per CTA, K splits) on the device:

    python scripts/sweep_mma.py --shapes 8192x28672,4096x4096 --Ms 1,16,32 --wc 1,2,4 --splits 0,1,2,4

Each point sets MBWQ_MMA_WC / MBWQ_MMA_SPLITS (csrc/cuda/gemm_mma.cu reads them at every call;
0 = the built-in choice) and times mbwq::gemm like scripts/bench.py (CUDA-graph replays over
weight copies larger than L2, median). Prints one line per point; the fastest per (shape, M)
is marked with *.
"""
import argparse
import os

import torch

from bench import clone_layer_args, copies_for, make_layer, read_bandwidth, time_graph


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8192x28672")
    ap.add_argument("--formats", default="q4_g128")
    ap.add_argument("--Ms", default="1,16")
    ap.add_argument("--wc", default="0")
    ap.add_argument("--splits", default="0")
    args = ap.parse_args()
    bw = read_bandwidth()["sum_tbs"]
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bw:.2f} TB/s")
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        for f in args.formats.split(","):
            layer, wbytes = make_layer(f, K, N)
            arg_sets = clone_layer_args(layer, copies_for(wbytes))
            for M in (int(m) for m in args.Ms.split(",")):
                xs = [torch.randn(M, K, device="cuda", dtype=torch.float16) for _ in arg_sets]
                rows = []
                for wc in args.wc.split(","):
                    for sp in args.splits.split(","):
                        os.environ["MBWQ_MMA_WC"], os.environ["MBWQ_MMA_SPLITS"] = wc, sp
                        us = time_graph([lambda x=x, a=a: torch.ops.mbwq.gemm(x, *a)
                                         for x, a in zip(xs, arg_sets)])
                        rows.append((us, wc, sp))
                best = min(rows)[0]
                for us, wc, sp in rows:
                    pct = 100 * wbytes / us / 1e6 / bw
                    print(f"{K}x{N} {f} M={M:<3} wc={wc} splits={sp:<2} {us:8.1f} us "
                          f"{pct:5.1f}% bw {'*' if us == best else ''}", flush=True)
            os.environ.pop("MBWQ_MMA_WC"), os.environ.pop("MBWQ_MMA_SPLITS")


if __name__ == "__main__":
    main()
