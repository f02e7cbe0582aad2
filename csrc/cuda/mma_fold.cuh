// Scale after the product, for one row of x (plan.h: kMmaConfigs' fold row, fp16 x). The
// exact decode (mma_decode.cuh) spends three instructions on each pair of weights: mask the
// codes, make them exact fp16 codes, then c * scale - zero. Here the mma multiplies x by the
// codes as they lie in the word, and the scale and zero are applied once per group and column
// in fp32: one instruction per pair of weights.
//
// ---------------------------------------------------------------------------------------
// Codes as fp16 subnormals. decode_pairs leaves pair i at bit E = pair_offset(B, i) of both
// halves of a word. Masked and nothing else, such a half is an fp16 number with exponent field
// 0, the subnormal
//     c * 2^E * 2^-24            exactly, for any code (E + B <= 10)
// and the mma's products with x are exact in its fp32 accumulation.
//
// Offsets as token columns. Products of different E differ by a power of two and cannot share
// an accumulator unscaled. With one row of x, the mma's B operand (16 k x 8 tokens) has 7
// empty token columns: class n = the column that collects the k indices of offset E_n.
//     class n    0   1   2   3   4   5      columns 6 and 7 stay zero
//     E_n        0   2   3   4   5   6      n = E == 0 ? 0 : E - 1  (E = 1 never occurs)
// B[k][n] = x_k where k's pair has class n, else 0. Lane (g, t) supplies column g, so each of
// its four B registers of a block is x (token 0, read by every lane) or 0, by its pair's class:
// one select per register and block. Then for one group of a column
//     C[col][n] = sum over k of class n of  c_k 2^(E_n - 24) x_k        (the mma, per block)
//     X         = sum_k x_k                         (a second mma: A = ones, B = x in every column)
// and at the group's end (fold_group), with s and z the group's scale and zero of the column,
//     Y[col][n] += s * C[col][n]
//     Y[col][0] += -z * X * 2^-24                   (only in the lane that holds class 0)
// and after the last block (fold_finish)
//     y[col] = sum_n 2^(24 - E_n) * Y[col][n]        = sum_groups (s * sum_k c_k x_k - z * X).
//
// A lane's accumulator registers (FragC of mma i, mma.cuh): r[0] = (A row g, class 2t),
// r[1] = (row g, class 2t + 1), r[2] = (row g + 8, class 2t), r[3] = (row g + 8, class 2t + 1).
// So lanes t = 0, 1, 2 hold classes 0-1, 2-3, 4-5; t = 3 holds the two empty columns.
//
// Accuracy. The products are exact; what rounds is fp32: the mma's sums, s * C, z * X and the
// sums over groups. The error is a few fp32 units of the terms' size, sum |s c x| + |z x|,
// rather than of sum |w x| as with the exact fp16 weight; the two differ only where a group's
// c * s and z nearly cancel (tests/test_cuda.py: test_fold_row_where_scale_and_zero_cancel).
//
// Infinite x. The exact rows give w * inf, the reference's +-inf; here s * C - z * X would be
// inf - inf = NaN. So fold_group notes whether every group's X was finite, and a warp for which
// one was not recomputes its range with the exact decode instead (gemm_mma.cu: exact_range), a
// slow path for inputs that are already broken; the loop pays one compare per group.
// ---------------------------------------------------------------------------------------
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"         // FragA, FragB, FragC, BlockA, MmaOp
#include "mma_decode.cuh"  // decode_pairs, pair_offset, comp, scale_word

namespace mbwq {
namespace cuda {

constexpr int kFoldClasses = 6;
__host__ __device__ constexpr int fold_class(int E) { return E == 0 ? 0 : E - 1; }
__host__ __device__ constexpr int fold_offset(int n) { return n == 0 ? 0 : n + 1; }
static_assert(fold_class(pair_offset(2, 3)) < kFoldClasses &&
                  fold_class(pair_offset(3, 2)) < kFoldClasses &&
                  fold_class(pair_offset(5, 1)) < kFoldClasses,
              "every pair offset has a class");

// The fold decode's pair maker (decode_pairs' Make): the two codes at bit E of word's halves,
// masked in place: the subnormals c * 2^(E - 24).
struct SubnormalCodes {
  template <int B, int E>
  static __device__ __forceinline__ __half2 pair(uint32_t word) {
    return as_h2(word & kPairMask<B, E>);
  }
};

// The B registers of one block for width B: code[s] for k-step s (x where the pair's class is
// the lane's column g, else 0) and all[s] (x in every column, for X). x: the block's 64 bytes
// of x (the one row) in shared memory, rows 8t .. 8t + 7 at 16t as [x0 x4 | x1 x5 | x2 x6 |
// x3 x7] (mma_decode.cuh's header): register j of step s is pair 2s + j's rows.
struct FoldB {
  FragB code[2], all[2];
};
template <int B>
__device__ __forceinline__ FoldB fold_b(const unsigned char* x, int g, int t) {
  const uint4 xb = *reinterpret_cast<const uint4*>(x + 16 * t);  // every lane: the one row
  const uint32_t v[4] = {xb.x, xb.y, xb.z, xb.w};
  FoldB b;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    b.code[i / 2].r[i % 2] = g == fold_class(pair_offset(B, i)) ? v[i] : 0u;
    b.all[i / 2].r[i % 2] = v[i];
  }
  return b;
}

// Quad q of a block of width B: the lane's words lo / hi of its columns (as decode_half),
// decoded to subnormal codes, times the block's class-sorted x into acc[2q + k] (C above).
template <int B, int QN>
__device__ __forceinline__ void fold_quad(int q, const uint4& lo, const uint4& hi, int t,
                                          const FoldB& xb, FragC (&acc)[2 * QN][1]) {
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const CodePairs pa = decode_pairs<B, SubnormalCodes>(comp(lo, k), comp(hi, k), t);
    const CodePairs pb = decode_pairs<B, SubnormalCodes>(comp(lo, k + 2), comp(hi, k + 2), t);
    BlockA a;
    place_pairs<__half>(pa, pb, a, [](__half2 c, int) { return c; });  // the subnormal codes
    MmaOp<__half>::run_block(acc[2 * q + k][0], a, xb.code[0], xb.code[1]);
  }
}

// X of one block into xsum (every register): ones times x in every column.
__device__ __forceinline__ void fold_x_sum(const FoldB& xb, FragC& xsum) {
  constexpr uint32_t kOnes = 0x3C003C00u;  // (1.0, 1.0) in fp16
  const FragA ones{{kOnes, kOnes, kOnes, kOnes}};
  MmaOp<__half>::run_block(xsum, BlockA{{ones, ones}}, xb.all[0], xb.all[1]);
}

// The lane's value of column u (quad u / 4, half u % 4) in a group's scales or -zeros, in fp32.
template <int QN>
__device__ __forceinline__ float lane_column(const uint2 (&v)[QN], int u) {
  const __half2 w = as_h2(scale_word(v, u));
  return __half2float((u & 1) ? __high2half(w) : __low2half(w));
}

// The end of a group: Y += s * C, Y[class 0] += -z * X * 2^-24, then C and X back to 0 (above).
// sc / zr: the group's scales and zeros, 4 QN columns a lane in the exact decode's layout. Only
// lanes t = 0 hold class 0, so the others add 0 * z.
// finite: cleared when X is not (an infinity or NaN in the group's x).
template <int QN>
__device__ __forceinline__ void fold_group(FragC (&acc)[2 * QN][1], FragC& xsum,
                                           const uint2 (&sc)[QN], const uint2 (&zr)[QN], int t,
                                           FragC (&y)[2 * QN], bool& finite) {
  finite = finite && isfinite(xsum.r[0]);
  const float xs = xsum.r[0] * (t == 0 ? 0x1p-24f : 0.f);
#pragma unroll
  for (int q = 0; q < QN; ++q)
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int i = 2 * q + k, ua = 4 * q + k, ub = ua + 2;  // A rows g, g + 8 (decode_half)
      const float sa = lane_column(sc, ua), sb = lane_column(sc, ub);
      FragC& c = acc[i][0];
      y[i].r[0] = fmaf(sa, c.r[0], y[i].r[0]);
      y[i].r[1] = fmaf(sa, c.r[1], y[i].r[1]);
      y[i].r[2] = fmaf(sb, c.r[2], y[i].r[2]);
      y[i].r[3] = fmaf(sb, c.r[3], y[i].r[3]);
      y[i].r[0] = fmaf(-lane_column(zr, ua), xs, y[i].r[0]);
      y[i].r[2] = fmaf(-lane_column(zr, ub), xs, y[i].r[2]);
      c = FragC{{0.f, 0.f, 0.f, 0.f}};
    }
  xsum = FragC{{0.f, 0.f, 0.f, 0.f}};
}

// 2^(24 - E_n) for class n, 0 for the empty columns 6 and 7.
__device__ __forceinline__ float fold_weight(int n) {
  return n < kFoldClasses ? __int_as_float((127 + 24 - fold_offset(n)) << 23) : 0.f;
}

// After the last fold: y[col] = sum_n 2^(24 - E_n) Y[col][n] over the lane's two classes and
// then over the four lanes t of a row group (butterfly: every lane adds the same values in
// the same pairs, so all four hold the same bits), into acc in the exact decode's layout
// (token 0 = register 0 / 2 of lane t = 0; every other token 0), for finish_tile.
template <int QN>
__device__ __forceinline__ void fold_finish(const FragC (&y)[2 * QN], int t,
                                            FragC (&acc)[2 * QN][1]) {
  const float f0 = fold_weight(2 * t), f1 = fold_weight(2 * t + 1);
#pragma unroll
  for (int i = 0; i < 2 * QN; ++i) {
    float va = f0 * y[i].r[0] + f1 * y[i].r[1];
    float vb = f0 * y[i].r[2] + f1 * y[i].r[3];
    va += __shfl_xor_sync(~0u, va, 1);
    vb += __shfl_xor_sync(~0u, vb, 1);
    va += __shfl_xor_sync(~0u, va, 2);
    vb += __shfl_xor_sync(~0u, vb, 2);
    acc[i][0] = FragC{{t == 0 ? va : 0.f, 0.f, t == 0 ? vb : 0.f, 0.f}};
  }
}

}  // namespace cuda
}  // namespace mbwq
