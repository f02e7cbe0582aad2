// Hopper warpgroup MMA (wgmma) for the tensor-core GEMM (gemm_mma.cu, 65 .. 128 tokens on
// sm_90a): the decoded weights stay the A operand in registers, x is the B operand in shared
// memory.
//
// A warpgroup (4 warps) runs one m64nNk16 per wgmma, N = 8 * MT = 128 tokens. Warp w supplies
// A rows 16w .. 16w + 15 in the same per-warp fragment layout as mma.m16n8k16
// (mma_decode.cuh), and holds D rows 16w + g, 16w + g + 8 like the mma's C: so decode_half's
// registers and the accumulators acc[i][mt][e] mean exactly what they mean on the mma.sync
// path, and the warp's mma i becomes the warpgroup's wgmma i (QN = 1: i = 0, 1; 32 columns a
// warp).
//
// B in shared memory, "K-major" without swizzle: 8 x 8 core matrices of 8 tokens x 16 bytes
// (8 k). mma_decode.cuh fixes which stored row each k-index of a k-step stands for; for k-step
// s, k-indices 0..7 are stored rows p + 4i (i = 0..7) with p = 2s, k-indices 8..15 the same with
// p = 2s + 1. So a block's x is kept as four pieces p = 0..3 of 8 rows each, token-major:
//
//   slot x:  | piece 0: token 0 (16 B) token 1 ... token 8MT-1 | piece 1 ... | piece 3 |
//   k-step s: start = piece 2s, next core matrix in k (LBO) = one piece (8MT x 16 bytes),
//             next 8 tokens (SBO) = 128 bytes.
//
// gather_x writes xs with every 16-byte chunk already one piece of one token
// (XOrder::kWgmma, gather.cu), so the ring copies chunks and only places them.
//
// Pipelining: a block runs as two halves (A row sets k = 0, 1), each decoded into registers of
// its own and committed as one group of two wgmma; after each commit the kernel waits for the
// group before it. So the decode of one half overlaps the products of the previous one, and the
// ring keeps one slot more than mma.sync out of reuse (the last group may still read its x).
//
//   decode h0 | commit h0 | wait(h1 of the last block) | decode h1 | commit h1 | wait(h0) | ...
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace mbwq {
namespace cuda {

// wgmma exists in the sm_90a pass only; elsewhere these are never reached (the host launches
// the wgmma kernels on compute capability 9.0 only) and compile to nothing.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MBWQ_WGMMA 1
#define MBWQ_WGMMA_ASM(...) asm volatile(__VA_ARGS__)
#else
#define MBWQ_WGMMA 0
#define MBWQ_WGMMA_ASM(...) \
  do {                      \
  } while (0)
#endif

// Register writes (A fragments, accumulators) before this are seen by the wgmma after it.
__device__ __forceinline__ void wgmma_fence() {
  MBWQ_WGMMA_ASM("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  MBWQ_WGMMA_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Wait until at most N committed wgmma groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  MBWQ_WGMMA_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// This thread's shared-memory writes (cp.async) are ordered before later wgmma reads of them
// (wgmma reads its shared operands through the async proxy); a CTA barrier must follow.
__device__ __forceinline__ void fence_proxy_async() {
  MBWQ_WGMMA_ASM("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Shared-memory matrix descriptor of a K-major, unswizzled operand (header): start address,
// leading byte offset (next core matrix along k), stride byte offset (next 8 rows), each >> 4.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr >> 4) & 0x3FFF) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32);
}

// One wgmma m64n128k16, d += A B (scale-d 1, no negation, B not transposed): A = {a0..a3} from
// registers, B from `desc`, d = the 64 accumulators of a thread (acc[k] of the kernel,
// [16][4] flattened).
#define MBWQ_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define MBWQ_WGMMA_N128(TYPES)                                                                 \
  MBWQ_WGMMA_ASM("wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPES " {"                     \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "      \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "      \
                 "%30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "      \
                 "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "      \
                 "%58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n"     \
                 : MBWQ_D4(0), MBWQ_D4(4), MBWQ_D4(8), MBWQ_D4(12), MBWQ_D4(16), MBWQ_D4(20),  \
                   MBWQ_D4(24), MBWQ_D4(28), MBWQ_D4(32), MBWQ_D4(36), MBWQ_D4(40),            \
                   MBWQ_D4(44), MBWQ_D4(48), MBWQ_D4(52), MBWQ_D4(56), MBWQ_D4(60)             \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc))
template <typename T>
__device__ __forceinline__ void wgmma_n128(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                           uint32_t a3, uint64_t desc) {
  if constexpr (std::is_same<T, __half>::value) {
    MBWQ_WGMMA_N128("f16.f16");
  } else {
    MBWQ_WGMMA_N128("bf16.bf16");
  }
}
#undef MBWQ_WGMMA_N128
// One wgmma m64n256k16 (gemm_tile.cu), otherwise as wgmma_n128: d = the 128 accumulators of a
// thread, [32][4] flattened (token tile j, element e as for mma.m16n8k16's C).
#define MBWQ_WGMMA_N256(TYPES)                                                                 \
  MBWQ_WGMMA_ASM("wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPES " {"                     \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "  \
                 "%30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
                 "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "  \
                 "%58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, "  \
                 "%72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, "  \
                 "%86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, "  \
                 "%100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "  \
                 "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, "  \
                 "%124, %125, %126, %127"  \
                 "}, {%128, %129, %130, %131}, %132, 1, 1, 1, 0;\n"                          \
                 : MBWQ_D4(0), MBWQ_D4(4), MBWQ_D4(8), MBWQ_D4(12), MBWQ_D4(16), MBWQ_D4(20),  \
                   MBWQ_D4(24), MBWQ_D4(28), MBWQ_D4(32), MBWQ_D4(36), MBWQ_D4(40),  \
                   MBWQ_D4(44), MBWQ_D4(48), MBWQ_D4(52), MBWQ_D4(56), MBWQ_D4(60),  \
                   MBWQ_D4(64), MBWQ_D4(68), MBWQ_D4(72), MBWQ_D4(76), MBWQ_D4(80),  \
                   MBWQ_D4(84), MBWQ_D4(88), MBWQ_D4(92), MBWQ_D4(96), MBWQ_D4(100),  \
                   MBWQ_D4(104), MBWQ_D4(108), MBWQ_D4(112), MBWQ_D4(116), MBWQ_D4(120),  \
                   MBWQ_D4(124) \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc))
template <typename T>
__device__ __forceinline__ void wgmma_n256(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                           uint32_t a3, uint64_t desc) {
  if constexpr (std::is_same<T, __half>::value) {
    MBWQ_WGMMA_N256("f16.f16");
  } else {
    MBWQ_WGMMA_N256("bf16.bf16");
  }
}
#undef MBWQ_WGMMA_N256
#undef MBWQ_D4

// wgmma m64nTOKENSk16 (TOKENS = 128 or 256) into d, TOKENS / 2 accumulators.
template <typename T, int TOKENS>
__device__ __forceinline__ void wgmma_tokens(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint64_t desc) {
  static_assert(TOKENS == 128 || TOKENS == 256, "wgmma_tokens: 128 or 256 tokens");
  if constexpr (TOKENS == 128) {
    wgmma_n128<T>(d, a0, a1, a2, a3, desc);
  } else {
    wgmma_n256<T>(d, a0, a1, a2, a3, desc);
  }
}

// Shared-memory offset of token n's piece p in a slot's x (header), MT token tiles.
template <int MT>
__device__ __forceinline__ int wgmma_x_offset(int n, int p) {
  return (p * 8 * MT + n) * 16;
}

// Half k of one 32-row block: the two k-steps of A row set k (decode_half's registers `a`) into
// acc[k], as one committed group. x: shared address of the block's x.
template <typename T, int MT>
__device__ __forceinline__ void wgmma_half(const uint32_t (&a)[8], uint32_t x,
                                           float (&acc)[MT][4]) {
  static_assert(MT == 16, "wgmma_half: 128 tokens (m64n128k16)");
  constexpr uint32_t kPiece = 8 * MT * 16;
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < 2; ++s)
    wgmma_n128<T>(&acc[0][0], a[4 * s], a[4 * s + 1], a[4 * s + 2], a[4 * s + 3],
                  smem_desc(x + 2 * s * kPiece, kPiece, 128));
  wgmma_commit();
}

// The A registers `a` of a wgmma group that a wait has just covered: an empty asm that reads
// and writes them, so that the compiler keeps their values, in registers of their own, up to
// here. Rewriting the A operand of a wgmma in flight is undefined (PTX ISA), and the compiler
// does not see that the wgmma reads it after issue.
__device__ __forceinline__ void wgmma_operand_done(uint32_t (&a)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) asm volatile("" : "+r"(a[j]));
}

}  // namespace cuda
}  // namespace mbwq
