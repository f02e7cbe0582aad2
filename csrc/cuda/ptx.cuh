// Small PTX wrappers of the mma.sync GEMM (gemm_mma.cu): cp.async copies into shared memory
// and their groups, named barriers. (The tile kernel's wgmma, bulk-copy and mbarrier wrappers
// are in wgmma.cuh; programmatic dependent launch in pdl.cuh; the mma instruction and its
// fragments in mma.cuh.)
#pragma once
#include <stdint.h>

namespace mbwq {
namespace cuda {

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  // src-size 0 fills the 16 bytes with zeros and reads nothing (columns past N)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
// Barrier `id` (1 .. 15; 0 is __syncthreads) for the `threads` threads (whole warps) that use it.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace cuda
}  // namespace mbwq
