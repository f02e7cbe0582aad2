// The mma.sync.m16n8k16 instruction (fp16 or bf16 in, fp32 out) and the register fragments of
// its operands, named: what each register of a lane holds. gemm_mma.cu's kernel issues it;
// wgmma.cuh's register A operand has the same per-warp layout (BlockA feeds both); the decode
// that fills the A fragments is mma_decode.cuh.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace mbwq {
namespace cuda {

// ---- fragments ----------------------------------------------------------------------------
// A lane's registers of the operands of one mma.sync.m16n8k16, lane = (g, t) with g = lane / 4
// (0..7) and t = lane % 4 (0..3). Row = output column of the warp tile (the kernels compute
// y^T = W^T x^T), k = reduction index.
//
//   FragA (16 x 16, 2 values a register)    FragB (16 k x 8 tokens)    FragC (16 x 8, fp32)
//     r[0]: row g,     k 2t, 2t+1             r[0]: k 2t, 2t+1            r[0], r[1]: row g,
//     r[1]: row g + 8, k 2t, 2t+1                   token g                       tokens 2t, 2t+1
//     r[2]: row g,     k 2t+8, 2t+9           r[1]: k 2t+8, 2t+9          r[2], r[3]: row g + 8,
//     r[3]: row g + 8, k 2t+8, 2t+9                 token g                       tokens 2t, 2t+1
//
struct FragA {
  uint32_t r[4];
};
struct FragB {
  uint32_t r[2];
};
struct FragC {
  float r[4];
};
// The A registers of one 32-row block: k-step 0 and k-step 1 (which stored row each k index
// stands for: mma_decode.cuh's header).
struct BlockA {
  FragA step[2];
};

// mma.sync.m16n8k16 with fp32 accumulators, A and B of type T (__half or __nv_bfloat16), and
// the conversion of an exact fp16 weight pair into A's element type. The two instantiations
// differ only in the PTX type name, so the instruction is written once.
#define MBWQ_MMA_M16N8K16(AB)                                                                  \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 {%0,%1,%2,%3}, "      \
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                    \
               : "+f"(d.r[0]), "+f"(d.r[1]), "+f"(d.r[2]), "+f"(d.r[3])                       \
               : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]))

template <typename T>
struct MmaOp {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "mma.sync operands are fp16 or bf16");
  static __device__ __forceinline__ void run(FragC& d, const FragA& a, FragB b) {
    if constexpr (std::is_same_v<T, __half>) {
      MBWQ_MMA_M16N8K16("f16");
    } else {
      MBWQ_MMA_M16N8K16("bf16");
    }
  }
  // Both k-steps of a 32-row block: d += step 0 x b0, then step 1 x b1.
  static __device__ __forceinline__ void run_block(FragC& d, const BlockA& a, FragB b0,
                                                   FragB b1) {
    run(d, a.step[0], b0);
    run(d, a.step[1], b1);
  }
  // fp16: the pair as it is; bf16: each weight rounded to bf16 (fp16 -> fp32 is exact, so
  // this is the one rounding).
  static __device__ __forceinline__ uint32_t from_fp16x2(__half2 w) {
    if constexpr (std::is_same_v<T, __half>) {
      return *reinterpret_cast<uint32_t*>(&w);
    } else {
      __nv_bfloat162 v = __float22bfloat162_rn(__half22float2(w));
      return *reinterpret_cast<uint32_t*>(&v);
    }
  }
};
#undef MBWQ_MMA_M16N8K16

}  // namespace cuda
}  // namespace mbwq
