// What x becomes before the tensor cores see it, in one place for the two kernels that make it:
// the gather kernels of gather.cu (a separate launch that writes xs) and the M = 1 mma.sync
// kernel that reads x itself (gemm_mma.cu, configurations with gather_x in plan.h):
//
//     xs[m, k] = round_T(x[m, perm[k]] * channel_scale[perm[k]])     NaN where perm[k] is
//                                                                     outside [0, K)
// (perm = identity and no channel_scale: xs = x). One element is read in two steps, so that a
// caller can keep both in flight: its source column (x_source), then x and the scale at that
// column (XLoad), which x_value combines (gather.cu's eight-at-a-time loads end in it too).
#pragma once
#include <stdint.h>

#include "common.cuh"
#include "launch.h"  // XOrder

namespace mbwq {
namespace cuda {

// The raw activations and how to bring them into stored row order.
template <typename T>
struct XArgs {
  const T* x;           // [M, K]
  const int32_t* perm;  // stored row -> input feature, or nullptr (identity)
  const void* cs;       // channel_scale or nullptr
  int cs_kind;
};

// Stored row of element i of 16-byte chunk c. Within 32-row block b = c / 4, chunk c % 4 holds
// (mma_decode.cuh, wgmma.cuh):
//   plain:           rows 8c .. 8c + 7
//   mma.sync order:  rows 8c .. 8c + 7 as [0 4 1 5 2 6 3 7] (one load = both k-steps' B regs)
//   tile order:      rows 32b + p + 4i, i = 0..7, p = c % 4 (one piece of wgmma's B operand)
template <XOrder O>
__host__ __device__ constexpr int chunk_row(int c, int i) {
  if constexpr (O == XOrder::kTile) return 32 * (c / 4) + c % 4 + 4 * i;
  if constexpr (O == XOrder::kMma) return 8 * c + i / 2 + 4 * (i % 2);
  return 8 * c + i;
}

// The inverse in mma.sync order: the element (0..7) of its chunk that stored row r holds.
__host__ __device__ constexpr int mma_chunk_element(int r) { return 2 * (r % 4) + (r % 8) / 4; }
constexpr bool mma_chunk_element_inverts_chunk_row() {
  for (int r = 0; r < 8; ++r)
    if (chunk_row<XOrder::kMma>(0, mma_chunk_element(r)) != r) return false;
  return true;
}
static_assert(mma_chunk_element_inverts_chunk_row(), "mma_chunk_element: not chunk_row's inverse");

// round_T(v * cs), the value the scaled x holds (v itself when there is no scale).
template <typename T>
__device__ __forceinline__ T scaled(const XArgs<T>& a, T v, float cs) {
  return a.cs_kind == kAuxNone ? v : Cvt<T>::from_f(Cvt<T>::to_f(v) * cs);
}

// Source column of stored row k.
template <typename T>
__device__ __forceinline__ int x_source(const XArgs<T>& a, int k) {
  return a.perm != nullptr ? a.perm[k] : k;
}

// x and channel_scale at one source column of row `row` (x + m * K), as loaded; x through L2
// only (load16_l2's reason: the previous kernel in the stream writes x).
template <typename T>
struct XLoad {
  T v;
  float cs;
  bool ok;  // the source lies in [0, K)
};
template <typename T>
__device__ __forceinline__ XLoad<T> x_load(const XArgs<T>& a, const T* row, int src, int K) {
  static_assert(sizeof(T) == 2, "x_load: fp16 / bf16 activations");
  XLoad<T> l;
  l.ok = unsigned(src) < unsigned(K);
  const int j = l.ok ? src : 0;
  const uint16_t bits = __ldcg(reinterpret_cast<const unsigned short*>(row + j));
  l.v = *reinterpret_cast<const T*>(&bits);
  l.cs = a.cs_kind == kAuxNone ? 1.f : aux_load(a.cs, a.cs_kind, j);
  return l;
}
template <typename T>
__device__ __forceinline__ T x_value(const XArgs<T>& a, const XLoad<T>& l) {
  return l.ok ? scaled(a, l.v, l.cs) : Cvt<T>::from_f(qnan());
}

}  // namespace cuda
}  // namespace mbwq
