// Programmatic dependent launch (Hopper on): a kernel launched with launch_chained may be
// scheduled while the previous kernel in the stream is still running. Every chained kernel
// calls wait_prior_grid() before it reads anything an earlier kernel writes (or writes
// anything), so only its independent prologue overlaps; allow_next_grid() lets the next one be
// scheduled early. Inside CUDA graphs the launch becomes a programmatic edge. Before Hopper
// both device calls are no-ops and the launch is a plain one. MBWQ_MMA_NO_PDL=1 launches
// plainly (for comparison).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "launch.h"

namespace mbwq {
namespace cuda {

// Let the next kernel in the stream be scheduled now (it still waits for this one's results).
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Wait until the previous kernel in the stream has finished and its writes are visible.
__device__ __forceinline__ void wait_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

template <typename... KArgs, typename... Args>
void launch_chained(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                    cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  // per device: a process may hold GPUs of several kinds
  const bool use = pdl_enabled();
  cfg.attrs = attr;
  cfg.numAttrs = use ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...));
}

}  // namespace cuda
}  // namespace mbwq
