// Small PTX wrappers of the mma.sync GEMM (gemm_mma.cu): cp.async copies into shared memory
// and their groups, named barriers, thread-block clusters. (The tile kernel's wgmma, bulk-copy
// and mbarrier wrappers are in wgmma.cuh; programmatic dependent launch in pdl.cuh; the mma
// instruction and its fragments in mma.cuh.)
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

// Thread-block clusters (compute capability 9.0; elsewhere every CTA is a cluster of one): the
// CTAs of this CTA's cluster, its rank among them, a barrier of every thread of the cluster
// (release / acquire: shared-memory writes before it are seen by the peers after it), and a
// 4-byte load from the same offset of a peer CTA's shared memory.
__device__ __forceinline__ int cluster_ctas() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t n;
  asm("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
  return int(n);
#else
  return 1;
#endif
}
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t r;
  asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return int(r);
#else
  return 0;
#endif
}
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ float ld_peer_shared(const float* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  uint32_t peer;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(peer) : "r"(a), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(peer) : "memory");
  return v;
#else
  return *p;
#endif
}

}  // namespace cuda
}  // namespace mbwq
