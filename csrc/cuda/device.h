// Device queries and launch attributes for the CUDA launchers: read once per device, no
// per-call driver queries beyond cudaGetDevice. Host code only.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "../plan.h"

namespace mbwq {
namespace cuda {

// compute(device) for the current device, computed once per device into `cache` (at least 1;
// devices from 64 on share the last entry): for values constant for the process.
template <typename F>
int once_per_device(int (&cache)[64], F compute) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int& v = cache[std::min(dev, 63)];
  if (v == 0) v = std::max(compute(dev), 1);
  return v;
}

// Raises `kernel`'s dynamic shared-memory limit to `bytes` on the current device (above 48 KB
// a launch fails without it).
template <typename Kernel>
void set_smem_limit(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}
// The same once per device (`cache`: one per kernel instantiation).
template <typename Kernel>
void allow_smem_once(int (&cache)[64], Kernel kernel, size_t bytes) {
  once_per_device(cache, [&](int) {
    set_smem_limit(kernel, bytes);
    return 1;
  });
}

// Multiprocessor count and compute-capability major of the current device.
int sm_count();
int compute_capability_major();
// The most dynamic shared memory one CTA may ask for on the current device (after
// set_smem_limit): 227 KB on Hopper, less on earlier GPUs.
int smem_optin_limit();

// The wgmma tile kernel can run here: compute capability 9.0 (the sm_90a code). Whether the
// plan uses it is plan_gemm's choice (MBWQ_MMA_NO_WGMMA turns it off there).
bool wgmma_available();

// What plan_gemm needs to know of the current device.
DeviceFacts device_facts();

// Programmatic dependent launch (pdl.cuh): Hopper and later, unless MBWQ_MMA_NO_PDL.
bool pdl_enabled();

}  // namespace cuda
}  // namespace mbwq
