"""How fast can one kernel read a layer's bytes? A read-only probe, for the roofline.

The bench's `read_bw_tbs` is a 2 GiB reduction: launch, ramp-up and tail are small against it.
A decode-sized layer is 9-125 MB, where they are not. This script times plain read kernels
(16-byte loads, several in flight per thread, an XOR of the words so that the loads stay) at
each size, with buffers rotated past L2 like the benchmark's layers, and reports the fastest
configuration per size: the ceiling for any kernel that must read those bytes once.

Two access patterns:
  linear  grid-stride over the buffer, UNROLL loads in flight per thread;
  strips  the buffer as [rows, row_bytes] (a qweight), read the way gemm_mma reads it at M = 1:
          a warp owns a 256-byte column strip (16 lanes x 16 bytes, two rows per load) and a
          contiguous range of rows; a CTA is WC column warps x 8 / WC row warps; grid =
          column tiles x row splits.

    python scripts/read_ceiling.py                      # table + $OUT/read_ceiling.json
    ncu -k regex:read_ python scripts/read_ceiling.py --profile read_ceiling.json
                                                        # each best configuration, once

Needs nvcc and ninja (the kernels are compiled at start, ~30 s). scripts/bench.py takes its
size-matched read ceiling from fastest_read_us.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import copies_for, time_graph  # noqa: E402

CUDA_SRC = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

// Rarely true: keeps the XOR (and so the loads) without a store per thread.
__device__ __forceinline__ void keep(unsigned acc, unsigned* out) {
  if (acc == 0x9e3779b9u) out[0] = acc;
}
__device__ __forceinline__ unsigned fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.cs.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
// The step's values folded last load first, in a chain the compiler cannot reorder (a
// multiply-add, unlike XOR, is not reassociated), so that more loads are in flight before the
// first wait: 8 of 16 in the SASS (an XOR in load order: 4 or 5 whatever UNROLL).
template <int UNROLL>
__device__ __forceinline__ unsigned fold_all(unsigned acc, const uint4 (&v)[UNROLL]) {
#pragma unroll
  for (int u = UNROLL - 1; u >= 0; --u) acc = acc * 0x9e3779b1u + fold(v[u]);
  return acc;
}

template <int UNROLL>
__global__ void read_linear(const uint4* __restrict__ p, long long n, unsigned* out) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned acc = 0;
  for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = ld_stream(p + i + u * stride);
    acc = fold_all(acc, v);
  }
  for (; i < n; i += stride) acc ^= fold(ld_stream(p + i));
  keep(acc, out);
}

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

#define DISPATCH(U, ...) \
  switch (U) { case 4: { constexpr int kU = 4; __VA_ARGS__; break; } \
               case 8: { constexpr int kU = 8; __VA_ARGS__; break; } \
               case 16: { constexpr int kU = 16; __VA_ARGS__; break; } \
               default: TORCH_CHECK(false, "unroll must be 4, 8 or 16, got ", U); }

void linear(torch::Tensor buf, torch::Tensor out, int64_t blocks, int64_t threads,
            int64_t unroll) {
  auto s = c10::cuda::getCurrentCUDAStream();
  const auto* p = reinterpret_cast<const uint4*>(buf.data_ptr());
  auto* o = reinterpret_cast<unsigned*>(out.data_ptr());
  DISPATCH(unroll, read_linear<kU><<<blocks, threads, 0, s>>>(p, buf.nbytes() / 16, o));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
CPP_SRC = """
void linear(torch::Tensor buf, torch::Tensor out, int64_t blocks, int64_t threads, int64_t unroll);
void strips(torch::Tensor buf, torch::Tensor out, int64_t rows, int64_t wc, int64_t splits,
            int64_t unroll);
"""

# (name, rows, row_bytes): the qweight of the bench's layers (4-bit: K / 8 rows of N words);
# the linear sweep also runs at these totals and at sizes for the fit.
LAYERS = [("4096x4096 q4", 512, 4096 * 4), ("8192x28672 mixed 2.5", 640, 28672 * 4),
          ("8192x28672 q4", 1024, 28672 * 4), ("28672x8192 q4", 3584, 8192 * 4)]
FIT_MB = [8, 16, 32, 64, 128, 256, 512, 2048]


_module = None
_build_error = None  # a failed build is not retried (bench.py asks once per layer)


def build():
    global _module, _build_error
    if _build_error is not None:
        raise _build_error
    if _module is None:
        try:
            _module = load_inline(
                "mbwq_read_probe", CPP_SRC, cuda_sources=CUDA_SRC,
                functions=["linear", "strips"], verbose=False,
                extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"])
        except Exception as e:  # noqa: BLE001 - kept for the next call
            _build_error = e
            raise
    return _module


def buffers(nbytes, n=None):
    """n (default: enough to rotate past L2) random int32 buffers of nbytes."""
    n = n or copies_for(nbytes)
    return [torch.randint(-2 ** 31, 2 ** 31 - 1, (nbytes // 4,), dtype=torch.int32,
                          device="cuda") for _ in range(n)]


# Linear configurations (threads a CTA, CTAs an SM, loads in flight a thread): the full sweep,
# and the few that won at every size in it (H200) for callers that only need the ceiling.
ALL_LINEAR = [(t, c, u) for t in (256, 512, 1024) for c in (1, 2, 4, 8) for u in (4, 8, 16)
              if t * c <= 2048]
FEW_LINEAR = [(256, 8, 4), (256, 4, 8), (512, 4, 8), (512, 2, 8), (1024, 2, 8)]


def fastest_read_us(bufs, configs=FEW_LINEAR):
    """(us, config) of the fastest linear read of one of `bufs` (16-byte multiples, rotated
    per call), or None where the probe cannot be built (no nvcc / ninja)."""
    try:
        mod = build()
    except Exception as e:  # noqa: BLE001 - any build failure leaves torch's reductions
        print(f"read probe unavailable ({type(e).__name__}: {str(e)[:160]})")
        return None
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    best = None
    for threads, per_sm, unroll in configs:
        us = time_graph([lambda b=b: mod.linear(b, out, sms * per_sm, threads, unroll)
                         for b in bufs])
        if best is None or us < best[0]:
            best = (us, {"threads": threads, "ctas": sms * per_sm, "unroll": unroll})
    return best


def best_strips(mod, bufs, out, rows, row_bytes, sms):
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
    mod = build()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    if args.profile:
        return profile(mod, out, args.profile)
    records = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {sms} SMs")
    print(f"{'buffer':<24}{'MB':>8}{'pattern':>9}{'us':>9}{'TB/s':>7}  best configuration")
    for name, rows, row_bytes in LAYERS + [(f"{mb} MiB", 0, 0) for mb in FIT_MB]:
        nbytes = rows * row_bytes if rows else mb_bytes(name)
        bufs = buffers(nbytes)
        runs = [("linear", fastest_read_us(bufs, ALL_LINEAR if rows else FEW_LINEAR))]
        if rows:
            runs.append(("strips", best_strips(mod, bufs, out, rows, row_bytes, sms)))
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


def profile(mod, out, path):
    """Each timed configuration of `path` once, on a fresh buffer (launch order = file order)."""
    with open(path) as f:
        records = [r for r in json.load(f)["records"] if "pattern" in r]
    for r in records:
        buf = buffers(r["bytes"], 1)[0]
        if r["pattern"] == "linear":
            mod.linear(buf, out, r["ctas"], r["threads"], r["unroll"])
        else:
            mod.strips(buf, out, r["rows"], r["wc"], r["splits"], r["unroll"])
        torch.cuda.synchronize()
        print(f"profiled {r['buffer']} {r['pattern']}")


def mb_bytes(name):
    return int(name.split()[0]) << 20


if __name__ == "__main__":
    main()
