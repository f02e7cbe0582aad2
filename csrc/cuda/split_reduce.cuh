// The reduction of a GEMM split over K: the CTAs of each split write fp32 partials
// [splits, M, N], which are added in split order (deterministic), plus the bias, and rounded
// once to y's dtype. Two ways, the same additions in the same order (so the same bits):
//
//   reduce_splits          a second kernel, chained to the GEMM (gemm_tile.cu);
//   last_split_of_tile +   inside the GEMM kernel (gemm_mma.cu): every CTA of a column tile
//   reduce_tile            counts itself in the tile's counter once its partials are written;
//                          the CTA that counts last adds all of the tile's partials. No second
//                          launch and no wait for one, which at M = 1 on small layers is a
//                          sizeable part of the call. The counters start at zero: the x gather
//                          kernel that runs before the GEMM clears them (gather_x's `clear`).
#pragma once
#include <ATen/core/Tensor.h>

#include "common.cuh"
#include "pdl.cuh"

namespace mbwq {
namespace cuda {

template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ part, const void* __restrict__ bias,
                                     int bias_kind, T* __restrict__ y, int splits, int64_t MN,
                                     int N) {
  wait_prior_grid();  // the partials
  // The next call's x gather may be scheduled now: it waits for this kernel before it reads
  // anything, and without the early start its launch latency adds to every split call.
  allow_next_grid();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= MN) return;
  float v = 0.f;
  for (int s = 0; s < splits; ++s) v += part[s * MN + i];
  if (bias_kind != kAuxNone) v += aux_load(bias, bias_kind, i % N);
  y[i] = Cvt<T>::from_f(v);
}

// y [M, N] (T) = the sum of part [splits, M, N] (+ bias), chained to the GEMM kernel.
template <typename T>
void reduce_splits(const at::Tensor& part, const void* bias, int bias_kind, void* y,
                   cudaStream_t stream) {
  const int splits = int(part.size(0)), N = int(part.size(2));
  const int64_t MN = part.size(1) * part.size(2);
  launch_chained(reduce_splits_kernel<T>, dim3(unsigned((MN + 255) / 256)), dim3(256), 0, stream,
                 static_cast<const float*>(part.data_ptr<float>()), bias, bias_kind,
                 reinterpret_cast<T*>(y), splits, MN, N);
}

// Called by every thread of a CTA after its own stores of partials. True, in every thread,
// for the CTA that is the last of the tile's gridDim.y splits to arrive at counters[blockIdx.x];
// all splits' partials are then visible to it. (Each thread's fence orders its stores before
// the count; the counting thread's atomic sees every earlier count, and the barrier passes that
// on to the CTA.)
__device__ __forceinline__ bool last_split_of_tile(int* counters) {
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1) == int(gridDim.y) - 1;
  __syncthreads();
  if (last) __threadfence();
  return last != 0;
}

// y[m, n0 .. n1) for every m < M: the sum of the `splits` partials in split order, + bias, as
// reduce_splits_kernel computes it, by every thread of the CTA, four columns a thread (n0, n1
// and N multiples of 4; the partials read through L2, where the other CTAs' stores are).
template <typename T>
__device__ __forceinline__ void reduce_tile(const float* __restrict__ part,
                                            const void* __restrict__ bias, int bias_kind,
                                            T* __restrict__ y, int splits, int M, int N, int n0,
                                            int n1) {
  static_assert(sizeof(T) == 2, "fp16 / bf16 y");
  const int quads = (n1 - n0) / 4;
  for (int i = threadIdx.x; i < M * quads; i += blockDim.x) {
    const int m = i / quads, n = n0 + 4 * (i % quads);
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < splits; ++s) {
      const float4 p =
          __ldcg(reinterpret_cast<const float4*>(part + (int64_t(s) * M + m) * N + n));
      v[0] += p.x, v[1] += p.y, v[2] += p.z, v[3] += p.w;
    }
    if (bias_kind != kAuxNone)
#pragma unroll
      for (int c = 0; c < 4; ++c) v[c] += aux_load(bias, bias_kind, n + c);
    alignas(8) T o[4] = {Cvt<T>::from_f(v[0]), Cvt<T>::from_f(v[1]), Cvt<T>::from_f(v[2]),
                         Cvt<T>::from_f(v[3])};
    *reinterpret_cast<uint2*>(y + int64_t(m) * N + n) = *reinterpret_cast<const uint2*>(o);
  }
}

}  // namespace cuda
}  // namespace mbwq
