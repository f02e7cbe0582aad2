// Per-width decoders of one 32-row block of one column (format.h, FORMAT.md §4).
//
// A block of width b is b consecutive qweight words of one column, read as one little-endian
// bit string; row r holds string bits [r*b, r*b + b). Layouts within a block (| = word edge,
// rN = row N; codes that straddle two words are marked *):
//
//   b=2  word0: r0..r15          word1: r16..r31                        (16 per word)
//   b=3  word0: r0..r9, r10*lo2  word1: r10*hi1, r11..r20, r21*lo1      word2: r21*hi2, r22..r31
//   b=4  word0: r0..r7   word1: r8..r15   word2: r16..r23   word3: r24..r31      (8 per word)
//   b=5  word0: r0..r5, r6*lo2      word1: r6*hi3, r7..r11, r12*lo4     word2: r12*hi1, r13..r18,
//        r19*lo1   word3: r19*hi4, r20..r24, r25*lo3   word4: r25*hi2, r26..r31
//   b=6  word0: r0..r4, r5*lo2      word1: r5*hi4, r6..r9, r10*lo4      word2: r10*hi2, r11..r15
//        (16 rows per 3 words; words 3..5 repeat the pattern for r16..r31)
//   b=8  word w: rows 4w..4w+3 (one byte each)
//
// With the row loop unrolled every position is a compile-time constant: a straddling code
// costs one funnel shift, any other code one shift-and-mask, and the shift count never depends
// on data. (The tensor-core kernel decodes a lane's 8 codes at once instead: gemm_mma.cu.)
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace mbwq {
namespace cuda {

// Code of row r as an integer (same rule as format.h: block_code).
template <int BITS>
__device__ __forceinline__ uint32_t code_u32(const uint32_t (&w)[BITS], int r) {
  const int bit = r * BITS, j = bit >> 5, s = bit & 31;
  const uint32_t v = (s + BITS > 32) ? __funnelshift_r(w[j], w[j + 1], s) : (w[j] >> s);
  return v & ((1u << BITS) - 1u);
}

// fp16 weight exactly as the original computes it: one fused multiply-add, one rounding.
// The code becomes an fp16 value through the same mantissa trick (0x6400 = 1024.0, codes < 256).
__device__ __forceinline__ __half dequant_h(uint32_t code, __half scale, __half neg_zero) {
  const __half c = __hsub(__ushort_as_half(static_cast<unsigned short>(0x6400u | code)),
                          __ushort_as_half(static_cast<unsigned short>(0x6400u)));
  return __hfma(c, scale, neg_zero);
}

}  // namespace cuda
}  // namespace mbwq
