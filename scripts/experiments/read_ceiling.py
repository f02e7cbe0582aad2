"""How fast can one kernel read a layer's bytes? A read-only probe, for the roofline.

The bench's `read_bw_tbs` is a 2 GiB reduction: launch, ramp-up and tail are small against it.
A decode-sized layer is 9-125 MB, where they are not. This script times plain read kernels
(16-byte loads, several in flight per thread, an XOR of the words so that the loads stay) at
each size, with buffers rotated past L2 like the benchmark's layers, and reports the fastest
configuration per size: the ceiling for any kernel that must read those bytes once. A
least-squares fit over sizes splits the time into a fixed cost per kernel and a streaming rate.

Two access patterns:
  linear  grid-stride over the buffer, UNROLL loads in flight per thread (scripts/read_probe.py,
          the probe bench.py uses; swept here over all launch configurations);
  strips  the buffer as [rows, row_bytes] (a qweight), read the way gemm_mma reads it at M = 1:
          a warp owns a 256-byte column strip (16 lanes x 16 bytes, two rows per load) and a
          contiguous range of rows; a CTA is WC column warps x 8 / WC row warps; grid =
          column tiles x row splits.

    python scripts/experiments/read_ceiling.py          # table + $OUT/read_ceiling.json
    ncu -k regex:read_ python scripts/experiments/read_ceiling.py --profile read_ceiling.json
                                                        # each best configuration, once

Needs nvcc and ninja (the kernels are compiled at start, ~30 s each).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import read_probe  # noqa: E402
from read_probe import ALL_LINEAR, FEW_LINEAR, buffers, fastest_read_us  # noqa: E402
from timing import time_graph  # noqa: E402

STRIPS_SRC = read_probe.HELPERS_SRC + r"""
// p: [rows, row_chunks] 16-byte chunks. Warp (wc, kw) of CTA (x, y): columns chunks
// 16 * (x * WC + wc) + [0, 16), rows of split y, k-warp kw's contiguous share of them.
template <int UNROLL>
__global__ void read_strips(const uint4* __restrict__ p, int row_chunks, int rows, int wc,
                            int rows_per_split, unsigned* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wk = blockDim.x / 32 / wc, col_w = warp % wc, kw = warp / wc;
  const int r0 = blockIdx.y * rows_per_split, r1 = min(rows, r0 + rows_per_split);
  const int per = (r1 - r0 + wk - 1) / wk;
  const int a = r0 + kw * per, b = min(r1, a + per);
  const uint4* col = p + (blockIdx.x * wc + col_w) * 16 + lane % 16;
  unsigned acc = 0;
  int r = a + lane / 16;
  for (; r + 2 * (UNROLL - 1) < b; r += 2 * UNROLL) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = ld_stream(col + (long long)(r + 2 * u) * row_chunks);
    acc = fold_all(acc, v);
  }
  for (; r < b; r += 2) acc ^= fold(ld_stream(col + (long long)r * row_chunks));
  keep(acc, out);
}

void strips(torch::Tensor buf, torch::Tensor out, int64_t rows, int64_t wc, int64_t splits,
            int64_t unroll) {
  auto s = c10::cuda::getCurrentCUDAStream();
  const int row_chunks = buf.nbytes() / 16 / rows;
  TORCH_CHECK(row_chunks % (16 * wc) == 0, "row bytes must be a multiple of 256 * wc");
  const dim3 grid(row_chunks / (16 * wc), splits);
  const int per = (rows + splits - 1) / splits;
  const auto* p = reinterpret_cast<const uint4*>(buf.data_ptr());
  auto* o = reinterpret_cast<unsigned*>(out.data_ptr());
  DISPATCH(unroll, read_strips<kU><<<grid, 256, 0, s>>>(p, row_chunks, rows, wc, per, o));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""
STRIPS_DECL = """
void strips(torch::Tensor buf, torch::Tensor out, int64_t rows, int64_t wc, int64_t splits,
            int64_t unroll);
"""

# (name, rows, row_bytes): the qweight of the bench's layers (4-bit: K / 8 rows of N words);
# the linear sweep also runs at these totals and at sizes for the fit.
LAYERS = [("4096x4096 q4", 512, 4096 * 4), ("8192x28672 mixed 2.5", 640, 28672 * 4),
          ("8192x28672 q4", 1024, 28672 * 4), ("28672x8192 q4", 3584, 8192 * 4)]
FIT_MB = [8, 16, 32, 64, 128, 256, 512, 2048]


def build_strips():
    """The strip-order probe (`strips(buf, out, rows, wc, splits, unroll)`)."""
    return load_inline("mbwq_read_strips", STRIPS_DECL, cuda_sources=STRIPS_SRC,
                       functions=["strips"], verbose=False,
                       extra_cuda_cflags=read_probe.CUDA_FLAGS)


def best_strips(strips, bufs, out, rows, row_bytes, sms):
    best = None
    for wc in (1, 2, 4, 8):
        if (row_bytes // 16) % (16 * wc):
            continue
        tiles = row_bytes // (256 * wc)
        for splits in sorted({max(1, round(k * sms / tiles)) for k in (1, 2, 4)}):
            if rows // splits < 2 * (8 // wc):
                continue
            for unroll in (4, 8, 16):
                us = time_graph([lambda b=b: mod.strips(b, out, rows, wc, splits, unroll)
                                 for b in bufs])
                cfg = {"wc": wc, "splits": splits, "ctas": tiles * splits, "unroll": unroll}
                if best is None or us < best[0]:
                    best = (us, cfg)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."),
                                                   "read_ceiling.json"))
    ap.add_argument("--profile", metavar="JSON",
                    help="no timing: run each configuration of an earlier run's JSON once "
                         "(for ncu)")
    args = ap.parse_args()
    linear, strips = read_probe.build(), build_strips()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    if args.profile:
        return profile(linear, strips, out, args.profile)
    records = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {sms} SMs")
    print(f"{'buffer':<24}{'MB':>8}{'pattern':>9}{'us':>9}{'TB/s':>7}  best configuration")
    for name, rows, row_bytes in LAYERS + [(f"{mb} MiB", 0, 0) for mb in FIT_MB]:
        nbytes = rows * row_bytes if rows else mb_bytes(name)
        bufs = buffers(nbytes)
        runs = [("linear", fastest_read_us(bufs, ALL_LINEAR if rows else FEW_LINEAR))]
        if rows:
            runs.append(("strips", best_strips(strips, bufs, out, rows, row_bytes, sms)))
        for pattern, (us, cfg) in runs:
            tbs = nbytes / us / 1e6
            print(f"{name:<24}{nbytes / 1e6:>8.1f}{pattern:>9}{us:>9.2f}{tbs:>7.2f}  {cfg}")
            records.append({"buffer": name, "bytes": nbytes, "rows": rows, "pattern": pattern,
                            "us": us, "tbs": tbs, **cfg})
        del bufs
        torch.cuda.empty_cache()
    fit = [r for r in records if r["buffer"].endswith("MiB")]
    if len(fit) >= 2:  # us = fixed + bytes / bandwidth, least squares over the sizes
        xs, ys = [r["bytes"] / 1e6 for r in fit], [r["us"] for r in fit]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        fixed = my - slope * mx
        print(f"fit over {FIT_MB} MiB: us = {fixed:.2f} + MB / {1 / slope:.3f} TB/s")
        records.append({"fit_fixed_us": fixed, "fit_tbs": 1 / slope})
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": os.environ.get("MBWQ_COMMIT", "unknown"), "records": records},
                  f, indent=1)
    print(f"wrote {args.out}")


def profile(linear, strips, out, path):
    """Each timed configuration of `path` once, on a fresh buffer (launch order = file order)."""
    with open(path) as f:
        records = [r for r in json.load(f)["records"] if "pattern" in r]
    for r in records:
        buf = buffers(r["bytes"], 1)[0]
        if r["pattern"] == "linear":
            linear.linear(buf, out, r["ctas"], r["threads"], r["unroll"])
        else:
            strips.strips(buf, out, r["rows"], r["wc"], r["splits"], r["unroll"])
        torch.cuda.synchronize()
        print(f"profiled {r['buffer']} {r['pattern']}")


def mb_bytes(name):
    return int(name.split()[0]) << 20


if __name__ == "__main__":
    main()
