// Hopper warpgroup MMA (wgmma) for the tile kernel (gemm_tile.cu, sm_90a): the decoded weights
// stay the A operand in registers, x is the B operand in shared memory.
//
// A warpgroup (4 warps) runs m64nNk16, N = the tile's tokens (16 .. 256). Warp w supplies A
// rows 16w .. 16w + 15 in the same per-warp fragment layout as mma.m16n8k16 (mma_decode.cuh:
// decode_columns), and holds D rows 16w + g, 16w + g + 8 like the mma's C: so the decoded
// registers and the accumulators mean exactly what they mean on the mma.sync path.
//
// B in shared memory, "K-major" without swizzle: 8 x 8 core matrices of 8 tokens x 16 bytes
// (8 k). mma_decode.cuh fixes which stored row each k-index of a k-step stands for; for k-step
// s, k-indices 0..7 are stored rows p + 4i (i = 0..7) with p = 2s, k-indices 8..15 the same with
// p = 2s + 1. So a block's x is kept as four pieces p = 0..3 of 8 rows each, token-major:
//
//   slot x:  | piece 0: token 0 (16 B) token 1 ... token N-1 | piece 1 ... | piece 3 |
//   k-step s: start = piece 2s, next core matrix in k (LBO) = one piece (N x 16 bytes),
//             next 8 tokens (SBO) = 128 bytes.
//
// gather_x writes xs with every 16-byte chunk already one piece of one token, each 256-token
// block contiguous (XOrder::kTile, gather.cu), so a slot's x is one or four bulk copies.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "mma.cuh"  // FragA, BlockA

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

// Shared-memory matrix descriptor of a K-major, unswizzled operand (header): start address,
// leading byte offset (next core matrix along k), stride byte offset (next 8 rows), each >> 4.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr >> 4) & 0x3FFF) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32);
}

// wgmma m64nNk16 for N = 16 .. 256 tokens, d += A B (scale-d 1, no negation, B not transposed):
// A = {a0..a3} from registers, B from `desc`, d = the thread's N / 2 accumulators, [N / 8][4]
// flattened (token tile j, element e as for mma.m16n8k16's C). One function per N, spelled out
// by MBWQ_WGMMA_FN from the accumulators' operand numbers (MBWQ_P*: 8 a piece), the A and
// descriptor operands that follow them, and the accumulator constraints (MBWQ_D*).
#define MBWQ_P0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define MBWQ_P1 "%8, %9, %10, %11, %12, %13, %14, %15"
#define MBWQ_P2 "%16, %17, %18, %19, %20, %21, %22, %23"
#define MBWQ_P3 "%24, %25, %26, %27, %28, %29, %30, %31"
#define MBWQ_P4 "%32, %33, %34, %35, %36, %37, %38, %39"
#define MBWQ_P5 "%40, %41, %42, %43, %44, %45, %46, %47"
#define MBWQ_P6 "%48, %49, %50, %51, %52, %53, %54, %55"
#define MBWQ_P7 "%56, %57, %58, %59, %60, %61, %62, %63"
#define MBWQ_P8 "%64, %65, %66, %67, %68, %69, %70, %71"
#define MBWQ_P9 "%72, %73, %74, %75, %76, %77, %78, %79"
#define MBWQ_P10 "%80, %81, %82, %83, %84, %85, %86, %87"
#define MBWQ_P11 "%88, %89, %90, %91, %92, %93, %94, %95"
#define MBWQ_P12 "%96, %97, %98, %99, %100, %101, %102, %103"
#define MBWQ_P13 "%104, %105, %106, %107, %108, %109, %110, %111"
#define MBWQ_P14 "%112, %113, %114, %115, %116, %117, %118, %119"
#define MBWQ_P15 "%120, %121, %122, %123, %124, %125, %126, %127"
#define MBWQ_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define MBWQ_D8(i) MBWQ_D4(i), MBWQ_D4(i + 4)
#define MBWQ_D16(i) MBWQ_D8(i), MBWQ_D8(i + 8)
#define MBWQ_D32(i) MBWQ_D16(i), MBWQ_D16(i + 16)
#define MBWQ_D64(i) MBWQ_D32(i), MBWQ_D32(i + 32)
#define MBWQ_D128(i) MBWQ_D64(i), MBWQ_D64(i + 64)
#define MBWQ_WGMMA_FN(NAME, SHAPE, D_OPS, A_OPS, ...)                                         \
  template <typename T>                                                                       \
  __device__ __forceinline__ void NAME(float* d, uint32_t a0, uint32_t a1, uint32_t a2,       \
                                       uint32_t a3, uint64_t desc) {                          \
    if constexpr (std::is_same<T, __half>::value) {                                           \
      MBWQ_WGMMA_ASM("wgmma.mma_async.sync.aligned." SHAPE ".f32.f16.f16 {" D_OPS "}, " A_OPS \
                     ", 1, 1, 1, 0;\n"                                                         \
                     : __VA_ARGS__                                                            \
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));                        \
    } else {                                                                                  \
      MBWQ_WGMMA_ASM("wgmma.mma_async.sync.aligned." SHAPE ".f32.bf16.bf16 {" D_OPS "}, "     \
                     A_OPS ", 1, 1, 1, 0;\n"                                                   \
                     : __VA_ARGS__                                                            \
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));                        \
    }                                                                                         \
  }
// operands 0 .. 8n - 1 of the accumulators
#define MBWQ_R8 MBWQ_P0
#define MBWQ_R16 MBWQ_R8 ", " MBWQ_P1
#define MBWQ_R32 MBWQ_R16 ", " MBWQ_P2 ", " MBWQ_P3
#define MBWQ_R64 MBWQ_R32 ", " MBWQ_P4 ", " MBWQ_P5 ", " MBWQ_P6 ", " MBWQ_P7
#define MBWQ_R128 \
  MBWQ_R64 ", " MBWQ_P8 ", " MBWQ_P9 ", " MBWQ_P10 ", " MBWQ_P11 ", " MBWQ_P12 ", " MBWQ_P13 \
           ", " MBWQ_P14 ", " MBWQ_P15
MBWQ_WGMMA_FN(wgmma_n16, "m64n16k16", MBWQ_R8, "{%8, %9, %10, %11}, %12", MBWQ_D8(0))
MBWQ_WGMMA_FN(wgmma_n32, "m64n32k16", MBWQ_R16, "{%16, %17, %18, %19}, %20", MBWQ_D16(0))
MBWQ_WGMMA_FN(wgmma_n64, "m64n64k16", MBWQ_R32, "{%32, %33, %34, %35}, %36", MBWQ_D32(0))
MBWQ_WGMMA_FN(wgmma_n128, "m64n128k16", MBWQ_R64, "{%64, %65, %66, %67}, %68", MBWQ_D64(0))
MBWQ_WGMMA_FN(wgmma_n256, "m64n256k16", MBWQ_R128, "{%128, %129, %130, %131}, %132",
              MBWQ_D128(0))
#undef MBWQ_WGMMA_FN
#undef MBWQ_R8
#undef MBWQ_R16
#undef MBWQ_R32
#undef MBWQ_R64
#undef MBWQ_R128
#undef MBWQ_D4
#undef MBWQ_D8
#undef MBWQ_D16
#undef MBWQ_D32
#undef MBWQ_D64
#undef MBWQ_D128
#undef MBWQ_P0
#undef MBWQ_P1
#undef MBWQ_P2
#undef MBWQ_P3
#undef MBWQ_P4
#undef MBWQ_P5
#undef MBWQ_P6
#undef MBWQ_P7
#undef MBWQ_P8
#undef MBWQ_P9
#undef MBWQ_P10
#undef MBWQ_P11
#undef MBWQ_P12
#undef MBWQ_P13
#undef MBWQ_P14
#undef MBWQ_P15

// wgmma m64nTOKENSk16 into d, TOKENS / 2 accumulators; a: the warp's A fragment of the k16
// step (mma_decode.cuh's FragA layout).
template <typename T, int TOKENS>
__device__ __forceinline__ void wgmma_tokens(float* d, const FragA& a, uint64_t desc) {
  static_assert(TOKENS == 16 || TOKENS == 32 || TOKENS == 64 || TOKENS == 128 || TOKENS == 256,
                "wgmma_tokens: 16, 32, 64, 128 or 256 tokens");
  const uint32_t a0 = a.r[0], a1 = a.r[1], a2 = a.r[2], a3 = a.r[3];
  if constexpr (TOKENS == 16) {
    wgmma_n16<T>(d, a0, a1, a2, a3, desc);
  } else if constexpr (TOKENS == 32) {
    wgmma_n32<T>(d, a0, a1, a2, a3, desc);
  } else if constexpr (TOKENS == 64) {
    wgmma_n64<T>(d, a0, a1, a2, a3, desc);
  } else if constexpr (TOKENS == 128) {
    wgmma_n128<T>(d, a0, a1, a2, a3, desc);
  } else {
    wgmma_n256<T>(d, a0, a1, a2, a3, desc);
  }
}

// The A registers `a` of a wgmma group that a wait has just covered: an empty asm that reads
// and writes them, so that the compiler keeps their values, in registers of their own, up to
// here. Rewriting the A operand of a wgmma in flight is undefined (PTX ISA), and the compiler
// does not see that the wgmma reads it after issue.
__device__ __forceinline__ void wgmma_operand_done(BlockA& a) {
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a.step[s].r[j]));
}

}  // namespace cuda
}  // namespace mbwq
