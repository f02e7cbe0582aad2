// Tensor-core GEMM for small and medium M (fp16 / bf16 activations), reading the stored
// qweight directly: y^T [N, M] = W^T [N, K] . xs^T [K, M] with mma.sync.m16n8k16.
//
// Roles: W^T is the A operand (16 output columns x 16 k), xs^T the B operand (16 k x 8 tokens),
// fp32 accumulators. Every packed weight byte is read from DRAM once per call, whatever M.
// The kernel is built to spend as few instructions per weight as possible, because at small M
// it must keep up with DRAM: at the H100's issue rate, full bandwidth on 4-bit codes leaves
// ~5 instructions per code and lane. The decode below takes ~2.2; with the ring bookkeeping,
// copies and x loads the loop measured ~5 (BENCHMARKS.md), so it is issue-bound today.
//
// ---------------------------------------------------------------------------------------
// Work split.  CTA = 8 warps = WC column warps x WK = 8 / WC k-warps.
//
//   columns n ->    warp tile = 32*QN columns (QN = 1 or 2 quads of 4 columns per lane)
//        +-----------+-----------+
//   k    | wc=0 kw=0 | wc=1 kw=0 |     grid.x = column tiles of WC warp tiles
//   |    +-----------+-----------+     grid.y = K splits (fp32 partials + reduce kernel)
//   v    | wc=0 kw=1 | wc=1 kw=1 |     k-warps of a CTA take contiguous ranges of 32-row
//        +-----------+-----------+     blocks and add up through shared memory in order.
//
// Each warp streams its blocks through a private ring of STAGES shared-memory slots filled
// with cp.async (16-byte copies, STAGES - 1 blocks in flight, no CTA barrier in the loop).
// A slot holds the block's `bits` qweight rows of the warp's columns and, only when the
// block starts a new group, the scales and zeros rows:
//
//   slot: | row 0 (4*32*QN bytes) pad | row 1 pad | ... | row 7 pad | scales | zeros |
//           rows padded to 32 mod 128 bytes so that the LDS.128 below are conflict-free
//
// Activations come from the gathered, interleaved xs (gather_x_kernel) through the L1 cache:
// the column warps of a CTA and CTAs on the same SM read the same x lines.
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
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "../format.h"
#include "common.cuh"
#include "launch.h"

namespace mbwq {
namespace cuda {
namespace {

constexpr int kWarps = 8;  // warps per CTA

// Geometry of one ring slot for a warp tile of 32 * QN columns.
template <int QN>
struct Slot {
  static constexpr int kCols = 32 * QN;
  static constexpr int kChunks = kCols / 4;              // 16-byte chunks per qweight row
  static constexpr int kRowStride = 4 * kCols + 32;      // = 32 mod 128: conflict-free LDS.128
  static constexpr int kSzOffset = 8 * kRowStride;       // scales row, then zeros row (fp16)
  static constexpr int kSlotBytes = kSzOffset + 4 * kCols;
};

// ---- small PTX wrappers -----------------------------------------------------------------

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  // src-size 0 fills the 16 bytes with zeros and reads nothing (columns past N)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t from_fp16x2(__half2 w) {
    return *reinterpret_cast<uint32_t*>(&w);
  }
};

template <>
struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t from_fp16x2(__half2 w) {
    __nv_bfloat162 v = __float22bfloat162_rn(__half22float2(w));
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

__device__ __forceinline__ __half2 as_h2(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }

// (v & MASK) | 0x6400_6400 in one LOP3 (ptxas does not fuse two immediates by itself).
template <uint32_t MASK>
__device__ __forceinline__ uint32_t mask_or_magic(uint32_t v) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(v), "n"(MASK), "r"(0x64006400u));
  return d;
}

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

// The lane's 8 codes of one column as the pairs P0..P3 (header), from the two words that hold
// its bytes [t*B, t*B + B): lo = word j0, hi = word j0 + 1. Bit layouts per width (format.h):
template <int B>
__device__ __forceinline__ void decode_pairs(uint32_t lo, uint32_t hi, int t, __half2 (&p)[4]) {
  const int sh = 8 * ((t * B) & 3);  // the lane's first bit inside lo
  if constexpr (B == 2) {
    // 16 bits: c0..c3 in byte (sh/8), c4..c7 in the next; spread them to bytes 0 and 2.
    const uint32_t v = __byte_perm(lo, 0u, 0x4140u + 0x0101u * (sh >> 3));
    p[0] = code_pair<0, 0x00030003u>(v);
    p[1] = code_pair<2, 0x000C000Cu>(v);
    p[2] = code_pair<4, 0x00300030u>(v);
    p[3] = code_pair<6, 0x00C000C0u>(v);
  } else if constexpr (B == 4) {
    // one word: c_i at bits 4i, c_{i+4} at 4i + 16, already 16 bits apart.
    const uint32_t v8 = lo >> 8;
    p[0] = code_pair<0, 0x000F000Fu>(lo);
    p[1] = code_pair<4, 0x00F000F0u>(lo);
    p[2] = code_pair<0, 0x000F000Fu>(v8);
    p[3] = code_pair<4, 0x00F000F0u>(v8);
  } else if constexpr (B == 8) {
    // c0..c3 = bytes of lo, c4..c7 = bytes of hi: byte i of each into halves 0 and 1.
    p[0] = code_pair<0, 0x00FF00FFu>(__byte_perm(lo, hi, 0x0400u));
    p[1] = code_pair<0, 0x00FF00FFu>(__byte_perm(lo, hi, 0x0501u));
    p[2] = code_pair<0, 0x00FF00FFu>(__byte_perm(lo, hi, 0x0602u));
    p[3] = code_pair<0, 0x00FF00FFu>(__byte_perm(lo, hi, 0x0703u));
  } else if constexpr (B == 3) {
    // 24 bits, c_i at 3i. Move c4..c7 (bits 12..23) up by 4: c_{i+4} lands at 16 + 3i.
    const uint32_t v = __funnelshift_r(lo, hi, sh);
    const uint32_t u = (v & 0xFFFu) | ((v << 4) & 0xFFFFF000u);
    p[0] = code_pair<0, 0x00070007u>(u);
    p[1] = code_pair<3, 0x00380038u>(u);
    p[2] = code_pair<6, 0x01C001C0u>(u);
    p[3] = code_pair<3, 0x00380038u>(u >> 6);
  } else {
    // B = 5 (40 bits) or 6 (48 bits): L = bits 0..31, C = bits 4B..4B+31 (c4..c7 at 0, B, 2B,
    // 3B). u1 = low halves of L and C (c0, c1[, c2] | c4, c5[, c6]); u2 = their bits 8..23.
    const uint32_t L = __funnelshift_r(lo, hi, sh);
    const uint32_t H = hi >> sh;
    const uint32_t C = __funnelshift_r(L, H, 4 * B);
    const uint32_t u1 = __byte_perm(L, C, 0x5410u);
    const uint32_t u2 = __byte_perm(L, C, 0x6521u);
    if constexpr (B == 5) {  // c0 0, c1 5, c2 10, c3 15..19 (u2: 7)
      p[0] = code_pair<0, 0x001F001Fu>(u1);
      p[1] = code_pair<5, 0x03E003E0u>(u1);
      p[2] = code_pair<0, 0x001F001Fu>(u1 >> 10);
      p[3] = code_pair<0, 0x001F001Fu>(u2 >> 7);
    } else {  // B = 6: c0 0, c1 6, c2 12..17 (u2: 4), c3 18..23 (u2: 10)
      p[0] = code_pair<0, 0x003F003Fu>(u1);
      p[1] = code_pair<0, 0x003F003Fu>(u1 >> 6);
      p[2] = code_pair<4, 0x03F003F0u>(u2);
      p[3] = code_pair<0, 0x003F003Fu>(u2 >> 10);
    }
  }
}

__device__ __forceinline__ uint32_t comp(const uint4& v, int e) {
  return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
}

__device__ __forceinline__ __half2 dup_half(uint32_t two_halves, int e) {
  return as_h2(__byte_perm(two_halves, 0u, (e & 1) ? 0x3232u : 0x1010u));
}

// The word of a lane's scales (or -zeros) that holds column u: quad u / 4, halves (u % 4) / 2.
template <int QN>
__device__ __forceinline__ uint32_t scale_word(const uint2 (&v)[QN], int u) {
  return (u % 4) < 2 ? v[u / 4].x : v[u / 4].y;
}

// One 32-row block of width B from ring slot `slot`: decode the lane's 8 codes of each of its
// 4*QN columns into exact fp16 weights and run the mma for all MT token tiles.
template <int B, int QN, int MT, typename T>
__device__ __forceinline__ void compute_block(const unsigned char* slot, int g, int t,
                                              const uint2 (&sc)[QN], const uint2 (&nz)[QN],
                                              const uint4 (&xb)[MT], float (&acc)[2 * QN][MT][4]) {
  using R = Slot<QN>;
  const int j0 = (t * B) >> 2;
#pragma unroll
  for (int q = 0; q < QN; ++q) {  // one quad at a time: only its words are live
    const unsigned char* p = slot + j0 * R::kRowStride + 128 * q + 16 * g;
    const uint4 lo = *reinterpret_cast<const uint4*>(p);
    // widths 2 and 4 never cross a word; the others may (the row exists in the slot)
    const uint4 hi = (B == 2 || B == 4) ? lo : *reinterpret_cast<const uint4*>(p + R::kRowStride);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      // mma i = 2q + k: A row g = lane column 4q + k, A row g + 8 = lane column 4q + k + 2
      const int i = 2 * q + k, ua = 4 * q + k, ub = ua + 2;
      __half2 pa[4], pb[4];
      decode_pairs<B>(comp(lo, k), comp(hi, k), t, pa);
      decode_pairs<B>(comp(lo, k + 2), comp(hi, k + 2), t, pb);
      // scale and -zero of both columns as (v, v) pairs
      const __half2 sa = dup_half(scale_word(sc, ua), ua), za = dup_half(scale_word(nz, ua), ua);
      const __half2 sb = dup_half(scale_word(sc, ub), ub), zb = dup_half(scale_word(nz, ub), ub);
      uint32_t wa[4], wb[4];
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        wa[s] = MmaOp<T>::from_fp16x2(__hfma2(pa[s], sa, za));
        wb[s] = MmaOp<T>::from_fp16x2(__hfma2(pb[s], sb, zb));
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        MmaOp<T>::run(acc[i][mt], wa[0], wb[0], wa[1], wb[1], xb[mt].x, xb[mt].y);
        MmaOp<T>::run(acc[i][mt], wa[2], wb[2], wa[3], wb[3], xb[mt].z, xb[mt].w);
      }
    }
  }
}

// The copies a lane queues for every block, fixed for the kernel: lane l copies 16-byte chunk
// l % kChunks of qweight rows l / kChunks, + 32 / kChunks, ... and, when the block starts a new
// group, lanes 0 .. kChunks - 1 copy the scales (first half) and zeros (second half) rows.
//
//   QN = 2: kChunks = 16   lanes 0-15 -> rows 0, 2, 4, 6   lanes 16-31 -> rows 1, 3, 5, 7
//   QN = 1: kChunks = 8    lanes 8r .. 8r+7 -> rows r, r + 4
template <int QN>
struct LaneCopies {
  using R = Slot<QN>;
  static constexpr int kRowStep = 32 / R::kChunks;
  // Column offsets, not pointers: the tensors' base addresses stay in the kernel's parameter
  // bank instead of taking registers.
  int q_col, sz_col;       // first column of the lane's qweight / scales-or-zeros chunk
  uint32_t q_dst, sz_dst;  // offsets inside a slot (q_dst: of row 0)
  int row0;
  bool q_ok, sz_ok, zeros_half;  // chunk inside [0, N)

  __device__ __forceinline__ LaneCopies(int N, int n_warp, int lane) {
    const int c = lane % R::kChunks;
    row0 = lane / R::kChunks;
    q_ok = n_warp + 4 * c < N;
    q_col = q_ok ? n_warp + 4 * c : 0;
    q_dst = 16 * c;  // + r * kRowStride for row r
    constexpr int kHalf = R::kChunks / 2;  // chunks per scales row
    const int which = (lane / kHalf) & 1, c2 = lane % kHalf;
    zeros_half = which;
    sz_ok = n_warp + 8 * c2 < N;
    sz_col = sz_ok ? n_warp + 8 * c2 : 0;
    sz_dst = R::kSzOffset + which * 2 * R::kCols + 16 * c2;
  }

  // Queue block (bits, word, group) into the slot at shared address `slot`.
  __device__ __forceinline__ void issue(uint32_t slot, int bits, int word, int group,
                                        bool new_group, const uint32_t* __restrict__ qweight,
                                        const uint16_t* __restrict__ scales,
                                        const uint16_t* __restrict__ zeros, int N) const {
    // rows row0, row0 + kRowStep, ... < bits: a fixed, predicated set (8 rows at most)
    const uint32_t* src = qweight + size_t(word + row0) * N + q_col;
    const uint32_t dst = slot + q_dst + row0 * R::kRowStride;
#pragma unroll
    for (int k = 0; k < 8 / kRowStep; ++k)
      if (row0 + k * kRowStep < bits)
        cp_async16(dst + k * kRowStep * R::kRowStride, src + size_t(k * kRowStep) * N, q_ok);
    if (new_group && row0 == 0)  // lanes 0 .. kChunks - 1
      cp_async16(slot + sz_dst, (zeros_half ? zeros : scales) + size_t(group) * N + sz_col, sz_ok);
  }
};


// True when a block of (bits, group) needs its group's scales and zeros: it is valid and its
// group differs from the last valid block's (`last`, updated; an invalid block resets it).
// The copy side and the compute side both walk the warp's blocks through this one rule, so a
// slot holds scales exactly when the consumer reloads them.
__device__ __forceinline__ bool starts_group(int bits, int group, int& last) {
  const bool start = bits != 0 && group != last;
  last = bits != 0 ? group : -1;
  return start;
}

// grid: (column tiles, splits); block: kWarps * 32 threads.
// xs: gathered, scaled, interleaved activations [M, K].
// out: splits == 1 -> y [M, N] (T) with bias; else fp32 partials [splits, M, N].
template <typename T, int MT, int QN, int STAGES, int MIN_CTAS>
__global__ void __launch_bounds__(kWarps * 32, MIN_CTAS)
    mma_gemm_kernel(const T* __restrict__ xs, const uint32_t* __restrict__ qweight,
                    const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
                    const int32_t* __restrict__ blocks, const void* __restrict__ bias,
                    int bias_kind, void* __restrict__ out, int M, int K, int N, int R, int G,
                    int WC, int blocks_per_split) {
  using Rg = Slot<QN>;
  constexpr int kStages = STAGES;
  constexpr int kWarpBytes = STAGES * Rg::kSlotBytes;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wc = warp % WC, kw = warp / WC, WK = kWarps / WC;
  const int n_warp = (blockIdx.x * WC + wc) * Rg::kCols;

  // This warp's contiguous range of blocks inside the CTA's K split.
  const int nblocks = K / kBlockRows;
  const int jb0 = blockIdx.y * blocks_per_split;
  const int len = max(0, min(blocks_per_split, nblocks - jb0));
  const int per = (len + WK - 1) / WK;
  const int wb = jb0 + kw * per;
  const int nb = max(0, min(per, len - kw * per));

  // The CTA's block table, validated, in shared memory: (bits | group << 4, word) per block,
  // bits == 0 for an entry that points outside qweight / scales (its output becomes NaN).
  int2* meta = reinterpret_cast<int2*>(smem + kWarps * kWarpBytes);
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    const BlockMeta b = load_block(blocks, jb0 + j, R, G);
    meta[j] = make_int2(b.bits | (b.group << 4), b.word);
  }
  __syncthreads();
  const int2* my_meta = meta + (wb - jb0);
  unsigned char* ring = smem + warp * kWarpBytes;
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));

  float acc[2 * QN][MT][4];
#pragma unroll
  for (int i = 0; i < 2 * QN; ++i)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[i][mt][0] = acc[i][mt][1] = acc[i][mt][2] = acc[i][mt][3] = 0.f;

  // Producer side: block i's copies go to ring slot i % kStages (kept as rotating indices);
  // scales and zeros only when starts_group says so.
  const LaneCopies<QN> copies(N, n_warp, lane);
  int issue_group = -1;
  auto issue = [&](int i, int slot) {
    const int2 e = my_meta[i];
    const int bits = e.x & 15, group = e.x >> 4;
    const bool new_group = starts_group(bits, group, issue_group);
    copies.issue(ring_s + slot * Rg::kSlotBytes, bits, e.y, group, new_group, qweight, scales,
                 zeros, N);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nb) issue(s, s);
    cp_async_commit();
  }

  // x fragments of the lane's tokens 8*mt + g (zero past M) for one block; xp walks the
  // warp's blocks (token g's row, 8 elements per lane).
  const T* xp = xs + int64_t(g) * K + int64_t(wb) * kBlockRows + 8 * t;
  auto load_x = [&](const T* p, uint4 (&xb)[MT]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      xb[mt] = 8 * mt + g < M ? __ldg(reinterpret_cast<const uint4*>(p + int64_t(8 * mt) * K))
                              : make_uint4(0, 0, 0, 0);
  };

  uint2 sc[QN], nz[QN];  // the lane's 4*QN scales and -zeros (fp16), this block's group
  int cur_group = -1;
  bool poisoned = false;
  // Several token tiles: x one block ahead in registers. One tile (80-register budget for
  // three CTAs per SM): loaded at the top of the iteration, its latency hidden by other warps.
  constexpr bool kPrefetchX = MT > 1;
  uint4 xb[MT], xn[MT];
  if (kPrefetchX && nb > 0) load_x(xp, xn);
  int slot_c = 0, slot_i = kStages - 1;  // ring slots of the block computed / issued next
  for (int i = 0; i < nb; ++i) {
    if constexpr (kPrefetchX) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) xb[mt] = xn[mt];
      xp += kBlockRows;
      if (i + 1 < nb) load_x(xp, xn);  // one block ahead
    } else {
      load_x(xp, xb);
      xp += kBlockRows;
    }
    cp_async_wait<kStages - 2>();
    __syncwarp();
    const unsigned char* slot = ring + slot_c * Rg::kSlotBytes;
    slot_c = slot_c + 1 == kStages ? 0 : slot_c + 1;
    const int2 e = my_meta[i];
    const int bits = e.x & 15, group = e.x >> 4;
    if (starts_group(bits, group, cur_group)) {
#pragma unroll
      for (int q = 0; q < QN; ++q) {
        sc[q] = *reinterpret_cast<const uint2*>(slot + Rg::kSzOffset + 64 * q + 8 * g);
        const uint2 z2 = *reinterpret_cast<const uint2*>(slot + Rg::kSzOffset + 2 * Rg::kCols +
                                                         64 * q + 8 * g);
        nz[q] = make_uint2(z2.x ^ 0x80008000u, z2.y ^ 0x80008000u);  // -zero: flip fp16 signs
      }
    }
    switch (bits) {
      case 2: compute_block<2, QN, MT, T>(slot, g, t, sc, nz, xb, acc); break;
      case 3: compute_block<3, QN, MT, T>(slot, g, t, sc, nz, xb, acc); break;
      case 4: compute_block<4, QN, MT, T>(slot, g, t, sc, nz, xb, acc); break;
      case 5: compute_block<5, QN, MT, T>(slot, g, t, sc, nz, xb, acc); break;
      case 6: compute_block<6, QN, MT, T>(slot, g, t, sc, nz, xb, acc); break;
      case 8: compute_block<8, QN, MT, T>(slot, g, t, sc, nz, xb, acc); break;
      default: poisoned = true;
    }
    __syncwarp();  // every lane is done with the slot before it is refilled
    if (i + kStages - 1 < nb) issue(i + kStages - 1, slot_i);
    slot_i = slot_i + 1 == kStages ? 0 : slot_i + 1;
    cp_async_commit();
  }
  cp_async_wait<0>();

  if (poisoned) {
#pragma unroll
    for (int i = 0; i < 2 * QN; ++i)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][mt][e] = qnan();
  }

  // Add the k-warps' partial sums in the fixed order kw = 0, 1, ..., WK - 1 (deterministic).
  constexpr int kRegs = 2 * QN * MT * 4;
  float* red = reinterpret_cast<float*>(smem);
  __syncthreads();  // every warp is done with its ring
  if (kw > 0) {
    float* dst = red + ((kw - 1) * WC + wc) * kRegs * 32 + lane;
#pragma unroll
    for (int i = 0; i < 2 * QN; ++i)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[((i * MT + mt) * 4 + e) * 32] = acc[i][mt][e];
  }
  __syncthreads();
  if (kw > 0) return;
  for (int k = 1; k < WK; ++k) {
    const float* src = red + ((k - 1) * WC + wc) * kRegs * 32 + lane;
#pragma unroll
    for (int i = 0; i < 2 * QN; ++i)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][mt][e] += src[((i * MT + mt) * 4 + e) * 32];
  }

  // Accumulator of mma i = 2q + k, tile mt: e = 0, 1 -> lane column 4q + k, tokens 8mt + 2t, +1;
  // e = 2, 3 -> lane column 4q + k + 2, same tokens. Lane column 4q + c is n_warp + 32q + 4g + c.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = 8 * mt + 2 * t + h;
      if (m >= M) continue;
#pragma unroll
      for (int q = 0; q < QN; ++q) {
        const int n = n_warp + 32 * q + 4 * g;
        if (n >= N) continue;  // N % 8 == 0: a quad is all in or all out
        float v[4];
#pragma unroll
        for (int c = 0; c < 4; ++c)  // column 4q + c: mma 2q + c % 2, A row g (c < 2) or g + 8
          v[c] = c < 2 ? acc[2 * q + c][mt][h] : acc[2 * q + c - 2][mt][2 + h];
        if (gridDim.y == 1) {
          if (bias_kind != kAuxNone)
#pragma unroll
            for (int c = 0; c < 4; ++c) v[c] += aux_load(bias, bias_kind, n + c);
          alignas(8) T o[4] = {Cvt<T>::from_f(v[0]), Cvt<T>::from_f(v[1]), Cvt<T>::from_f(v[2]),
                               Cvt<T>::from_f(v[3])};
          *reinterpret_cast<uint2*>(reinterpret_cast<T*>(out) + int64_t(m) * N + n) =
              *reinterpret_cast<const uint2*>(o);
        } else {
          *reinterpret_cast<float4*>(reinterpret_cast<float*>(out) +
                                     (int64_t(blockIdx.y) * M + m) * N + n) =
              make_float4(v[0], v[1], v[2], v[3]);
        }
      }
    }
  }
}

// Sum the split partials in a fixed order (deterministic), add bias, round once.
template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ part, const void* __restrict__ bias,
                                     int bias_kind, T* __restrict__ y, int splits, int64_t MN,
                                     int N) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= MN) return;
  float v = 0.f;
  for (int s = 0; s < splits; ++s) v += part[s * MN + i];
  if (bias_kind != kAuxNone) v += aux_load(bias, bias_kind, i % N);
  y[i] = Cvt<T>::from_f(v);
}

// xs[m, k'] = round_T(x[m, perm[k]] * channel_scale[perm[k]]) with k' the interleaved position
// of stored row k (see header). An out-of-range perm entry gives NaN.
template <typename T>
__global__ void gather_x_kernel(const T* __restrict__ x, const int32_t* __restrict__ perm,
                                const void* __restrict__ cs, int cs_kind, T* __restrict__ xs,
                                int M, int K, bool has_perm) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // one 8-row chunk
  const int chunks = K / 8;
  if (i >= int64_t(M) * chunks) return;
  const int m = int(i / chunks), c = int(i % chunks);
  T v[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    const int k = c * 8 + r;
    float f;
    const int src = has_perm ? perm[k] : k;
    if (src < 0 || src >= K) {
      f = qnan();
    } else {
      f = Cvt<T>::to_f(x[int64_t(m) * K + src]);
      if (cs_kind != kAuxNone) f = round_as<T>(f * aux_load(cs, cs_kind, src));
    }
    v[r] = Cvt<T>::from_f(f);
  }
  // chunk order [0 4 1 5 2 6 3 7]
  alignas(16) T o[8] = {v[0], v[4], v[1], v[5], v[2], v[6], v[3], v[7]};
  *reinterpret_cast<int4*>(xs + int64_t(m) * K + c * 8) = *reinterpret_cast<int4*>(o);
}

// Tuning hook for benchmarks: a positive integer from the environment (read at each call, so
// a sweep can change it in-process), else 0. Results do not depend on it beyond rounding order.
int tuning_override(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::max(0, std::atoi(v)) : 0;
}

// Most 32-row blocks one CTA takes (its block table lives in shared memory); longer K is split.
constexpr int kMaxBlocksPerCta = 1024;

// Kernel configurations: MT token tiles, QN quads per lane, STAGES ring slots per warp and the
// CTAs per SM the registers are sized for. Shared memory per CTA: 8 warps x STAGES slots + table
//   MT = 1: QN 2, 3 stages, 3 CTAs/SM (8 x 3 x 2560 + 8 KB = 68 KB; <= 80 registers)
//   MT = 2: QN 2, 4 stages, 2 CTAs/SM (88 KB)
//   MT = 4: QN 1, 4 stages, 2 CTAs/SM (52 KB; 4 token tiles need the registers)
template <typename T, int MT, int QN, int STAGES, int MIN_CTAS>
void run_kernel(const at::Tensor& xs, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& zeros, const at::Tensor& blocks, const void* bias_p,
                int bias_kind, void* out, int M, int WC, cudaStream_t stream) {
  const int K = xs.size(1), N = qweight.size(1);
  const int R = qweight.size(0), G = scales.size(0);
  const int nblocks = K / kBlockRows;
  auto kernel = mma_gemm_kernel<T, MT, QN, STAGES, MIN_CTAS>;
  const size_t ring = size_t(kWarps) * STAGES * Slot<QN>::kSlotBytes + kMaxBlocksPerCta * sizeof(int2);
  const size_t red = size_t(kWarps) * 2 * QN * MT * 4 * 32 * sizeof(float);
  const size_t smem = std::max(ring, red);
  // Raise the shared-memory limit and read the occupancy once per device.
  static int ctas_per_sm[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  dev = std::min(dev, 63);
  if (ctas_per_sm[dev] == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(smem)));
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kWarps * 32, smem));
    ctas_per_sm[dev] = std::max(n, 1);
  }
  const int tiles = (N + WC * Slot<QN>::kCols - 1) / (WC * Slot<QN>::kCols);
  const int WK = kWarps / WC;
  const int slots = sm_count() * ctas_per_sm[dev];
  // K splits: model the time as waves x (blocks per warp + a pipeline ramp of ~STAGES
  // blocks), plus the fp32 partials' traffic, and take the cheapest.
  const double weight_bytes = double(qweight.numel()) * 4;
  int best_s = 1;
  double best = 1e300;
  const int forced = tuning_override("MBWQ_MMA_SPLITS");
  const int s_min = (nblocks + kMaxBlocksPerCta - 1) / kMaxBlocksPerCta;
  for (int s = s_min; s <= std::max(s_min, std::min(64, nblocks / (2 * WK))); ++s) {
    const int bps = (nblocks + s - 1) / s;
    const int ss = (nblocks + bps - 1) / bps;
    const double waves = std::ceil(double(tiles) * ss / slots);
    const double per_warp = std::ceil(double(bps) / WK) + STAGES;
    const double partial = ss > 1 ? 2.0 * ss * M * N * 4 / weight_bytes : 0.0;
    const double cost = waves * per_warp * (1.0 + partial);
    if (cost < best * 0.999) best = cost, best_s = ss;
  }
  if (forced > 0) best_s = std::max(forced, s_min);
  const int bps = (nblocks + best_s - 1) / best_s;
  const int splits = (nblocks + bps - 1) / bps;

  at::Tensor part;
  void* dst = out;
  if (splits > 1) {
    part = at::empty({splits, M, N}, xs.options().dtype(at::kFloat));
    dst = part.data_ptr();
  }
  kernel<<<dim3(tiles, splits), kWarps * 32, smem, stream>>>(
      reinterpret_cast<const T*>(xs.data_ptr()),
      reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>()),
      reinterpret_cast<const uint16_t*>(scales.data_ptr()),
      reinterpret_cast<const uint16_t*>(zeros.data_ptr()), blocks.data_ptr<int32_t>(),
      splits > 1 ? nullptr : bias_p, bias_kind, dst, M, K, N, R, G, WC, bps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t MN = int64_t(M) * N;
    reduce_splits_kernel<T><<<(MN + 255) / 256, 256, 0, stream>>>(
        part.data_ptr<float>(), bias_p, bias_kind, reinterpret_cast<T*>(out), splits, MN, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
            const at::Tensor& zeros, const at::Tensor& blocks, const at::Tensor& perm,
            const std::optional<at::Tensor>& channel_scale, const std::optional<at::Tensor>& bias,
            at::Tensor& y) {
  const int M = x.size(0), K = x.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor xs = at::empty({M, K}, x.options());
  const at::Tensor cs_t = channel_scale.has_value() ? aux_tensor(*channel_scale) : at::Tensor();
  {
    const int64_t n = int64_t(M) * (K / 8);
    gather_x_kernel<T><<<(n + 255) / 256, 256, 0, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), perm.numel() ? perm.data_ptr<int32_t>() : nullptr,
        cs_t.defined() ? cs_t.data_ptr() : nullptr, cs_t.defined() ? aux_kind(cs_t) : kAuxNone,
        reinterpret_cast<T*>(xs.data_ptr()), M, K, perm.numel() > 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor bias_t = bias.has_value() ? aux_tensor(*bias) : at::Tensor();
  const void* bias_p = bias_t.defined() ? bias_t.data_ptr() : nullptr;
  const int bias_kind = bias_t.defined() ? aux_kind(bias_t) : kAuxNone;
  void* out = y.data_ptr();
  const int wc = tuning_override("MBWQ_MMA_WC");
  auto pick = [&](int dflt) { return (wc == 1 || wc == 2 || wc == 4 || wc == 8) ? wc : dflt; };
  // One token tile: two quads per lane (fewer instructions per weight), k-warps only.
  // More tiles: the x fragments of more tokens are shared by more column warps.
  if (M <= 8) {
    run_kernel<T, 1, 2, 3, 3>(xs, qweight, scales, zeros, blocks, bias_p, bias_kind, out, M, pick(1), stream);
  } else if (M <= 16) {
    run_kernel<T, 2, 2, 4, 2>(xs, qweight, scales, zeros, blocks, bias_p, bias_kind, out, M, pick(2), stream);
  } else {
    run_kernel<T, 4, 1, 4, 2>(xs, qweight, scales, zeros, blocks, bias_p, bias_kind, out, M, pick(4), stream);
  }
}

}  // namespace

bool mma_supported(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const at::Tensor& zeros) {
  auto aligned16 = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  return (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
         x.size(1) % 8 == 0 && qweight.size(1) % 8 == 0 && aligned16(x) && aligned16(qweight) &&
         aligned16(scales) && aligned16(zeros);
}

void gemm_mma(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
              const at::Tensor& zeros, const at::Tensor& blocks, const at::Tensor& perm,
              const std::optional<at::Tensor>& channel_scale,
              const std::optional<at::Tensor>& bias, at::Tensor& y) {
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMmaMaxM, "mbwq: tensor-core path needs 1 <= M <= ",
              kMmaMaxM, ", got M = ", x.size(0));
  TORCH_CHECK(mma_supported(x, qweight, scales, zeros),
              "mbwq: internal: tensor-core path called with unsupported arguments");
  if (x.scalar_type() == at::kHalf) {
    launch<__half>(x, qweight, scales, zeros, blocks, perm, channel_scale, bias, y);
  } else {
    launch<__nv_bfloat16>(x, qweight, scales, zeros, blocks, perm, channel_scale, bias, y);
  }
}

}  // namespace cuda
}  // namespace mbwq
