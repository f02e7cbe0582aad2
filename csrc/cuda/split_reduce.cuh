// The second kernel of a GEMM split over K (gemm_mma.cu, gemm_tile.cu): the CTAs of each split
// wrote fp32 partials [splits, M, N]; this adds them in split order (deterministic), adds the
// bias and rounds once to y's dtype.
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

}  // namespace cuda
}  // namespace mbwq
