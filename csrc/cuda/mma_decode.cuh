// Bit-level core of the tensor-core kernels (gemm_mma.cu): packed codes -> exact fp16
// weights -> mma.sync.m16n8k16, for one lane's share of a 32-row block.
//
// ---------------------------------------------------------------------------------------
// Which codes a lane decodes. Lane = (g, t) with g = lane / 4 (0..7), t = lane % 4 (0..3).
// The mma fixes which (n, k) entries of A a lane holds: rows (= output columns) g and g+8,
// k-columns {2t, 2t+1, 2t+8, 2t+9}. The k order inside a k16 step is ours to choose, as long
// as the B operand (x) uses the same one. Lane t decodes the 8 consecutive stored rows
// 8t .. 8t+7 of each 32-row block: bytes [t*b, t*b + b) of the column's b-word bit string,
// which lie in the block's words j0 = (t*b) / 4 and j0 + 1.
//
//   column strip of one block (b words, bit string little-endian):
//     | lane t=0: rows 0-7 | t=1: rows 8-15 | t=2: rows 16-23 | t=3: rows 24-31 |
//       bytes [0,b)          bytes [b,2b)     bytes [2b,3b)      bytes [3b,4b)
//
// A lane's 8 codes c0..c7 (rows 8t + i) become four half2 pairs P_i = (c_i, c_{i+4}):
//     k-step 0 A regs: {P0 col A, P0 col B, P1 col A, P1 col B}
//     k-step 1 A regs: {P2 col A, P2 col B, P3 col A, P3 col B}
// so mma k-index 2t <-> row 8t+2s, 2t+1 <-> 8t+2s+4, 2t+8 <-> 8t+2s+1, 2t+9 <-> 8t+2s+5, and
// xs stores every 8-row chunk as [x0 x4 | x1 x5 | x2 x6 | x3 x7]: one 16-byte load gives both
// k-steps' B registers.
//
// Columns: a lane owns the 4*QN columns 32q + 4g + e (quad q < QN, e < 4), read as one 16-byte
// load per quad and qweight row. Its mma i = 2q + k (k < 2) takes column 4q + k as A row g and
// column 4q + k + 2 as A row g+8, so one quad's words are decoded before the next is loaded.
//
// A code pair becomes fp16 without int->float conversions: with the pair's two codes masked
// in place at bits [e, e+b) and [16+e, 16+e+b) of a word,
//     0x6400 | (c << e)  is the fp16 number 1024 + c * 2^e  (exact while c * 2^e < 1024)
// and one HFMA2 (x 2^-e, - 1024 * 2^-e) gives c exactly. Then w = fma(c, scale, -zero) in fp16:
// one rounding, the original's exact weight. For bf16 activations w is converted to bf16.
// ---------------------------------------------------------------------------------------
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "mma.cuh"  // FragA, FragB, FragC, BlockA, MmaOp

namespace mbwq {
namespace cuda {

__device__ __forceinline__ __half2 as_h2(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }

// (v & MASK) | 0x6400_6400 in one LOP3 (ptxas does not fuse two immediates by itself).
template <uint32_t MASK>
__device__ __forceinline__ uint32_t mask_or_magic(uint32_t v) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(v), "n"(MASK), "r"(0x64006400u));
  return d;
}

// True where a lane's bytes [t*bits, t*bits + bits) of a block may reach into word j0 + 1, so
// that decode_pairs needs hi: every width but 2 and 4 (whose lanes stay inside one word).
__host__ __device__ constexpr bool reads_next_word(int bits) { return bits != 2 && bits != 4; }

// Where pair i = (c_i, c_{i+4}) of a width-B lane column sits once decode_pairs has moved it:
// at bit E = pair_offset(B, i) of both halves of a word. The exact decode (code_pair) and the
// fold decode (mma_fold.cuh, which sorts the products by E) both take the offsets from here.
//
//   B      2           3           4           5           6           8
//   E    0 2 4 6     0 3 6 3     0 4 0 4     0 5 0 0     0 0 4 0     0 0 0 0
__host__ __device__ constexpr int pair_offset(int B, int i) {
  return B == 2 ? 2 * i
       : B == 3 ? (i == 0 ? 0 : i == 2 ? 6 : 3)
       : B == 4 ? 4 * (i % 2)
       : B == 5 ? (i == 1 ? 5 : 0)
       : B == 6 ? (i == 2 ? 4 : 0)
       : 0;
}
// The two codes of pair i in its word: B bits at E in each half.
template <int B, int E>
constexpr uint32_t kPairMask = ((1u << B) - 1u) << E | ((1u << B) - 1u) << (16 + E);

// The two codes of v selected by MASK, at bit offset E inside each half (see the header) ->
// exact fp16 codes.
template <int E, uint32_t MASK>
__device__ __forceinline__ __half2 code_pair(uint32_t word) {
  const __half2 v = as_h2(mask_or_magic<MASK>(word));
  if constexpr (E == 0) {
    return __hsub2(v, as_h2(0x64006400u));  // (1024 + c) - 1024
  } else {
    constexpr uint32_t kScale = uint32_t(15 - E) << 10;             // 2^-E
    constexpr uint32_t kBias = 0x8000u | (uint32_t(25 - E) << 10);  // -(1024 * 2^-E)
    return __hfma2(v, as_h2(kScale | (kScale << 16)), as_h2(kBias | (kBias << 16)));
  }
}

// The lane's 8 codes of one column as fp16 pairs: p[i] = (c_i, c_{i+4}) (header).
struct CodePairs {
  __half2 p[4];
};

// The exact decode's pair maker: the two codes at bit E of word's halves -> exact fp16 codes.
struct ExactCodes {
  template <int B, int E>
  static __device__ __forceinline__ __half2 pair(uint32_t word) {
    return code_pair<E, kPairMask<B, E>>(word);
  }
};

// The lane's 8 codes of one column as the pairs P0..P3 (header), from the two words that hold
// its bytes [t*B, t*B + B): lo = word j0, hi = word j0 + 1. Per width, the codes are moved so
// that pair i lies at bit pair_offset(B, i) of both halves of a word, and Make::pair<B, E>
// turns that word into the pair's two values (ExactCodes above; the fold decode's subnormal
// codes, mma_fold.cuh). Bit layouts per width: format.h; decode_pairs_reference below is the
// exact decode the slow, obvious way.
template <int B, typename Make = ExactCodes>
__device__ __forceinline__ CodePairs decode_pairs(uint32_t lo, uint32_t hi, int t) {
  CodePairs out;
  __half2 (&p)[4] = out.p;
  const int sh = 8 * ((t * B) & 3);  // the lane's first bit inside lo
  auto pair = [](auto i, uint32_t word) {
    return Make::template pair<B, pair_offset(B, decltype(i)::value)>(word);
  };
  using I0 = std::integral_constant<int, 0>;
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I3 = std::integral_constant<int, 3>;
  if constexpr (B == 2) {
    // 16 bits: c0..c3 in byte (sh/8), c4..c7 in the next; spread them to bytes 0 and 2.
    const uint32_t v = __byte_perm(lo, 0u, 0x4140u + 0x0101u * (sh >> 3));
    p[0] = pair(I0{}, v);
    p[1] = pair(I1{}, v);
    p[2] = pair(I2{}, v);
    p[3] = pair(I3{}, v);
  } else if constexpr (B == 4) {
    // one word: c_i at bits 4i, c_{i+4} at 4i + 16, already 16 bits apart.
    const uint32_t v8 = lo >> 8;
    p[0] = pair(I0{}, lo);
    p[1] = pair(I1{}, lo);
    p[2] = pair(I2{}, v8);
    p[3] = pair(I3{}, v8);
  } else if constexpr (B == 8) {
    // c0..c3 = bytes of lo, c4..c7 = bytes of hi: byte i of each into halves 0 and 1.
    p[0] = pair(I0{}, __byte_perm(lo, hi, 0x0400u));
    p[1] = pair(I1{}, __byte_perm(lo, hi, 0x0501u));
    p[2] = pair(I2{}, __byte_perm(lo, hi, 0x0602u));
    p[3] = pair(I3{}, __byte_perm(lo, hi, 0x0703u));
  } else if constexpr (B == 3) {
    // 24 bits, c_i at 3i. Move c4..c7 (bits 12..23) up by 4: c_{i+4} lands at 16 + 3i.
    const uint32_t v = __funnelshift_r(lo, hi, sh);
    const uint32_t u = (v & 0xFFFu) | ((v << 4) & 0xFFFFF000u);
    p[0] = pair(I0{}, u);
    p[1] = pair(I1{}, u);
    p[2] = pair(I2{}, u);
    p[3] = pair(I3{}, u >> 6);
  } else {
    // B = 5 (40 bits) or 6 (48 bits): L = bits 0..31, C = bits 4B..4B+31 (c4..c7 at 0, B, 2B,
    // 3B). u1 = low halves of L and C (c0, c1[, c2] | c4, c5[, c6]); u2 = their bits 8..23.
    const uint32_t L = __funnelshift_r(lo, hi, sh);
    const uint32_t H = hi >> sh;
    const uint32_t C = __funnelshift_r(L, H, 4 * B);
    const uint32_t u1 = __byte_perm(L, C, 0x5410u);
    const uint32_t u2 = __byte_perm(L, C, 0x6521u);
    if constexpr (B == 5) {  // c0 0, c1 5, c2 10, c3 15..19 (u2: 7)
      p[0] = pair(I0{}, u1);
      p[1] = pair(I1{}, u1);
      p[2] = pair(I2{}, u1 >> 10);
      p[3] = pair(I3{}, u2 >> 7);
    } else {  // B = 6: c0 0, c1 6, c2 12..17 (u2: 4), c3 18..23 (u2: 10)
      p[0] = pair(I0{}, u1);
      p[1] = pair(I1{}, u1 >> 6);
      p[2] = pair(I2{}, u2);
      p[3] = pair(I3{}, u2 >> 10);
    }
  }
  return out;
}

// decode_pairs without bit tricks: each code read from the bit string by its position (the rule
// of format.h's block_code), converted to fp16 by value. For tests and for reading; every valid
// width gives the same pairs as decode_pairs.
template <int B>
__device__ __forceinline__ CodePairs decode_pairs_reference(uint32_t lo, uint32_t hi, int t) {
  const uint64_t bits = (uint64_t(hi) << 32 | lo) >> (8 * ((t * B) & 3));  // lane's bytes first
  CodePairs out;
  for (int i = 0; i < 4; ++i) {
    const auto code = [&](int r) { return unsigned((bits >> (r * B)) & ((1u << B) - 1u)); };
    out.p[i] = __halves2half2(__uint2half_rn(code(i)), __uint2half_rn(code(i + 4)));
  }
  return out;
}

__device__ __forceinline__ uint32_t comp(const uint4& v, int e) {
  return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
}

// Half e % 2 of two_halves in both halves. The half2 intrinsics (not a byte permute) let
// ptxas fold the broadcast into the HFMA2 operands (.H0_H0 / .H1_H1): no instruction.
__device__ __forceinline__ __half2 dup_half(uint32_t two_halves, int e) {
  return (e & 1) ? __high2half2(as_h2(two_halves)) : __low2half2(as_h2(two_halves));
}

// The word of a lane's scales (or -zeros) that holds column u: quad u / 4, halves (u % 4) / 2.
template <int QN>
__device__ __forceinline__ uint32_t scale_word(const uint2 (&v)[QN], int u) {
  return (u % 4) < 2 ? v[u / 4].x : v[u / 4].y;
}

// Two columns' fp16 pairs into a block's A registers (as T), one column per A row, each pair
// through value(pair, column) first (column 0: a, 1: b): pair s of column a (A row g) lands in
// step s / 2, register 2 (s % 2), pair s of column b (A row g + 8) in register 2 (s % 2) + 1:
// the FragA layout above.
template <typename T, typename Value>
__device__ __forceinline__ void place_pairs(const CodePairs& pa, const CodePairs& pb,
                                            BlockA& a, Value value) {
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    a.step[s / 2].r[2 * (s % 2)] = MmaOp<T>::from_fp16x2(value(pa.p[s], 0));
    a.step[s / 2].r[2 * (s % 2) + 1] = MmaOp<T>::from_fp16x2(value(pb.p[s], 1));
  }
}

// Two columns' codes of one 32-row block of width B as exact fp16 weights (as T), one column
// per A row: the lane's words lo_a / hi_a of its A-row-g column and lo_b / hi_b of its A-row-g+8
// column (hi: row j0 + 1, unused for widths 2 and 4), with each column's scale and -zero as
// (v, v) pairs, placed by place_pairs.
template <int B, typename T>
__device__ __forceinline__ void decode_columns(uint32_t lo_a, uint32_t hi_a, uint32_t lo_b,
                                               uint32_t hi_b, int t, __half2 sa, __half2 za,
                                               __half2 sb, __half2 zb, BlockA& a) {
  place_pairs<T>(decode_pairs<B>(lo_a, hi_a, t), decode_pairs<B>(lo_b, hi_b, t), a,
                 [&](__half2 c, int column) {
                   return column == 0 ? __hfma2(c, sa, za) : __hfma2(c, sb, zb);
                 });
}

// Half k of one quad (4 columns) of a 32-row block of width B: the lane's words lo (row j0) and
// hi (row j0 + 1; unused for widths 2 and 4) of lane columns 4q + k (A row g) and 4q + k + 2
// (A row g + 8) become exact fp16 weights (as T), the A registers of mma i = 2q + k.
template <int B, int QN, typename T>
__device__ __forceinline__ void decode_half(int q, int k, const uint4& lo, const uint4& hi, int t,
                                            const uint2 (&sc)[QN], const uint2 (&nz)[QN],
                                            BlockA& a) {
  const int ua = 4 * q + k, ub = ua + 2;
  // scale and -zero of both columns as (v, v) pairs
  decode_columns<B, T>(comp(lo, k), comp(hi, k), comp(lo, k + 2), comp(hi, k + 2), t,
                       dup_half(scale_word(sc, ua), ua), dup_half(scale_word(nz, ua), ua),
                       dup_half(scale_word(sc, ub), ub), dup_half(scale_word(nz, ub), ub), a);
}

// Both halves of quad q: a[k] = decode_half k.
template <int B, int QN, typename T>
__device__ __forceinline__ void decode_quad(int q, const uint4& lo, const uint4& hi, int t,
                                            const uint2 (&sc)[QN], const uint2 (&nz)[QN],
                                            BlockA (&a)[2]) {
#pragma unroll
  for (int k = 0; k < 2; ++k) decode_half<B, QN, T>(q, k, lo, hi, t, sc, nz, a[k]);
}

// decode_quad, then the mma for all MT token tiles. x: the block's x in shared memory, 8 tokens
// x 32 k a token tile, 64 bytes a token; lanes 0-7 of a quarter-warp read 128 contiguous bytes
// (conflict-free). Its fragments are loaded per tile, next to their mma, so that only one
// tile's are live (MT = 8 keeps 64 accumulators).
template <int B, int QN, int MT, typename T>
__device__ __forceinline__ void compute_quad(int q, const uint4& lo, const uint4& hi, int g, int t,
                                             const uint2 (&sc)[QN], const uint2 (&nz)[QN],
                                             const unsigned char* x, FragC (&acc)[2 * QN][MT]) {
  BlockA a[2];
  decode_quad<B, QN, T>(q, lo, hi, t, sc, nz, a);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    // x fragments of tokens 8 mt + g, k 8t .. 8t + 7: both k-steps' B registers
    const uint4 xb = *reinterpret_cast<const uint4*>(x + (8 * mt + g) * 64 + 16 * t);
    const FragB b0{{xb.x, xb.y}}, b1{{xb.z, xb.w}};
#pragma unroll
    for (int k = 0; k < 2; ++k) MmaOp<T>::run_block(acc[2 * q + k][mt], a[k], b0, b1);
  }
}

}  // namespace cuda
}  // namespace mbwq
