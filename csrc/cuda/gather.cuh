// What a gathered element of x is, for every kernel that gathers (gather.cu's gathers; the
// mma.sync fold row, which gathers its CTA's rows of x itself where MBWQ_MMA_GATHER=1 says so):
//
//     xs[m, k'] = round_T(x[m, perm[k]] * channel_scale[perm[k]])     (NaN if perm[k] is out of
//                                                                      range)
//
// for stored row k at position k' of a consumer's order (XOrder, launch.h), eight at a time (one
// 16-byte chunk).
#pragma once
#include <stdint.h>

#include "common.cuh"
#include "launch.h"

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
__device__ __forceinline__ int chunk_row(int c, int i) {
  if constexpr (O == XOrder::kTile) return 32 * (c / 4) + c % 4 + 4 * i;
  if constexpr (O == XOrder::kMma) return 8 * c + i / 2 + 4 * (i % 2);
  return 8 * c + i;
}

// round_T(v * cs), the value the scaled x holds (v itself when there is no scale).
template <typename T>
__device__ __forceinline__ T scaled(const XArgs<T>& a, T v, float cs) {
  return a.cs_kind == kAuxNone ? v : Cvt<T>::from_f(Cvt<T>::to_f(v) * cs);
}

// channel_scale[j[e]] as float (1 without a scale); one switch for all eight loads, so that
// they are issued together.
template <int KIND>
__device__ __forceinline__ void load_scales8_as(const void* p, const int (&j)[8], float (&cs)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) cs[e] = aux_load(p, KIND, j[e]);  // KIND folds aux_load's switch
}
template <typename T>
__device__ __forceinline__ void load_scales8(const XArgs<T>& a, const int (&j)[8], float (&cs)[8]) {
  switch (a.cs_kind) {
    case kAuxHalf: load_scales8_as<kAuxHalf>(a.cs, j, cs); break;
    case kAuxBF16: load_scales8_as<kAuxBF16>(a.cs, j, cs); break;
    case kAuxFloat: load_scales8_as<kAuxFloat>(a.cs, j, cs); break;
    default:
#pragma unroll
      for (int e = 0; e < 8; ++e) cs[e] = 1.f;
  }
}

// The source of element e of chunk c: perm[k] (or k) for its stored row k in order O. Outside
// [0, K) marks a bad perm entry (NaN).
template <XOrder O, typename T>
__device__ __forceinline__ int chunk_source(const XArgs<T>& a, int c, int e) {
  const int k = chunk_row<O>(c, e);
  return a.perm != nullptr ? a.perm[k] : k;
}

// Eight elements of x at sources src[e] (NaN where src[e] is outside [0, K)), scaled. Loads in
// three rounds (perm entries before this, then x, then channel_scale) so that a thread waits
// for three memory latencies, not one chain per element.
template <typename T>
__device__ __forceinline__ void load8(const XArgs<T>& a, const T* row, const int (&src)[8], int K,
                                      T (&o)[8]) {
  bool ok[8];
  int j[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    ok[e] = unsigned(src[e]) < unsigned(K);
    j[e] = ok[e] ? src[e] : 0;
    o[e] = row[j[e]];
  }
  float cs[8];
  load_scales8(a, j, cs);
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] = ok[e] ? scaled(a, o[e], cs[e]) : Cvt<T>::from_f(qnan());
}

}  // namespace cuda
}  // namespace mbwq
