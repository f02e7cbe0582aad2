"""The fastest plain read of a buffer: the ceiling for any kernel that must read those bytes.

A read-only CUDA kernel (16-byte streaming loads, UNROLL of them in flight per thread, the words
folded so that the loads stay) swept over a few launch configurations; `fastest_read_us`
returns the best time. scripts/bench.py uses it for `read_bw_tbs` and `read_same_bytes_us`;
scripts/experiments/read_ceiling.py sweeps it (and a strip-order variant) over sizes.

The kernel is compiled on first use with nvcc and ninja (~30 s). Where that fails, callers
fall back to torch's reductions; the failure is remembered, so it is not retried per layer.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import copies_for, time_graph  # noqa: E402

# Device helpers shared with the strip-order kernel of scripts/experiments/read_ceiling.py.
HELPERS_SRC = r"""
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

#define DISPATCH(U, ...) \
  switch (U) { case 4: { constexpr int kU = 4; __VA_ARGS__; break; } \
               case 8: { constexpr int kU = 8; __VA_ARGS__; break; } \
               case 16: { constexpr int kU = 16; __VA_ARGS__; break; } \
               default: TORCH_CHECK(false, "unroll must be 4, 8 or 16, got ", U); }
"""

LINEAR_SRC = HELPERS_SRC + r"""
// Grid-stride over the buffer, UNROLL loads in flight per thread.
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

void linear(torch::Tensor buf, torch::Tensor out, int64_t blocks, int64_t threads,
            int64_t unroll) {
  auto s = c10::cuda::getCurrentCUDAStream();
  const auto* p = reinterpret_cast<const uint4*>(buf.data_ptr());
  auto* o = reinterpret_cast<unsigned*>(out.data_ptr());
  DISPATCH(unroll, read_linear<kU><<<blocks, threads, 0, s>>>(p, buf.nbytes() / 16, o));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""
LINEAR_DECL = ("void linear(torch::Tensor buf, torch::Tensor out, int64_t blocks, "
               "int64_t threads, int64_t unroll);")
CUDA_FLAGS = ["-O3", "-gencode=arch=compute_90a,code=sm_90a"]

# Linear configurations (threads a CTA, CTAs an SM, loads in flight a thread): the full sweep,
# and the few that won at every size in it (H200) for callers that only need the ceiling.
ALL_LINEAR = [(t, c, u) for t in (256, 512, 1024) for c in (1, 2, 4, 8) for u in (4, 8, 16)
              if t * c <= 2048]
FEW_LINEAR = [(256, 8, 4), (256, 4, 8), (512, 4, 8), (512, 2, 8), (1024, 2, 8)]

_module = None
_build_error = None  # a failed build is not retried (bench.py asks once per layer)


def build():
    """The compiled probe (`linear(buf, out, blocks, threads, unroll)`); raises if it cannot be
    built, and raises the same error again on later calls."""
    global _module, _build_error
    if _build_error is not None:
        raise _build_error
    if _module is None:
        from torch.utils.cpp_extension import load_inline
        try:
            _module = load_inline("mbwq_read_probe", LINEAR_DECL, cuda_sources=LINEAR_SRC,
                                  functions=["linear"], verbose=False,
                                  extra_cuda_cflags=CUDA_FLAGS)
        except Exception as e:  # noqa: BLE001 - kept for the next call
            _build_error = e
            raise
    return _module


def buffers(nbytes, n=None):
    """n (default: enough to rotate past L2) random int32 buffers of nbytes."""
    n = n or copies_for(nbytes)
    return [torch.randint(-2 ** 31, 2 ** 31 - 1, (nbytes // 4,), dtype=torch.int32,
                          device="cuda") for _ in range(n)]


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
