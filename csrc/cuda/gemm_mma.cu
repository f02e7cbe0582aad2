// Tensor-core GEMM for small and medium M (fp16 / bf16 activations), reading the stored
// qweight directly: y^T [N, M] = W^T [N, K] . xs^T [K, M] with mma.sync.m16n8k16.
//
// Roles: W^T is the A operand (16 output columns x 16 k), xs^T the B operand (16 k x 8 tokens),
// fp32 accumulators. Every packed weight byte is read from DRAM once per call, whatever M.
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
// Each warp streams its blocks through a ring of STAGES cp.async slots in shared memory,
// STAGES - 1 blocks in flight: the weights' rows, the scales and zeros
// at group starts, and the block's x (8 tokens x 32 k per token tile, zero-filled past M). The
// loop waits only on the ring's cp.async groups. For M > 16 (CTA_X) the warps of a CTA are all
// column warps (WC = 8) and share x rings, one per group of 8 / XG warps, copied once per
// group: x then weighs as much as the warps' weights or more, and one copy per warp multiplied
// the L2 traffic by 8. Keeping x in registers one block ahead instead (an earlier design) put
// the x load on the same scoreboard as the weight loads: every iteration then waited for all of
// them, one block in flight per warp, and the time per block stayed the same for 2- and 4-bit
// layers.
//
// Ring slot:
//   slot: | row 0 (4*32*QN bytes) pad | row 1 pad | ... | row 7 pad | scales | zeros | x |
//           rows padded to 32 mod 128 bytes so that the LDS.128 are conflict-free
//
// Activations: gather_x (gather.cu, called by ops_cuda.cpp once for all the row chunks that read
// x in one order) writes x in stored row order, scaled and interleaved (xs), and the rings copy
// it block by block. (Gathering each CTA's K range inside this kernel instead saves a launch
// but delays the weight stream; benchmarks/ has the numbers.)
//
// ---------------------------------------------------------------------------------------
// The decode (which codes a lane takes, how they become fp16) is described in mma_decode.cuh.
// ---------------------------------------------------------------------------------------
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../format.h"
#include "common.cuh"
#include "launch.h"
#include "mma_decode.cuh"
#include "mma_fold.cuh"
#include "mma_tile.cuh"
#include "ptx.cuh"
#include "split_reduce.cuh"

namespace mbwq {
namespace cuda {
namespace {

// Geometry of one ring slot for a warp tile of 32 * QN columns.
template <int QN>
struct Slot {
  static constexpr int kCols = 32 * QN;
  static constexpr int kChunks = kCols / 4;              // 16-byte chunks per qweight row
  static constexpr int kRowStride = 4 * kCols + 32;      // = 32 mod 128: conflict-free LDS.128
  static constexpr int kSzOffset = 8 * kRowStride;       // scales row, then zeros row (fp16)
  static constexpr int kSlotBytes = kSzOffset + 4 * kCols;
};

// The lane's words of quad q in ring slot `slot` for a block of width B (mma_decode.cuh):
// lo = row j0 = (t * B) / 4, hi = row j0 + 1. Widths 2 and 4 never cross a word (hi = lo, not
// read); the others may (the row exists in the slot).
template <int B, int QN>
__device__ __forceinline__ void quad_words(const unsigned char* slot, int q, int g, int t,
                                           uint4& lo, uint4& hi) {
  using R = Slot<QN>;
  const unsigned char* p = slot + ((t * B) >> 2) * R::kRowStride + 128 * q + 16 * g;
  lo = *reinterpret_cast<const uint4*>(p);
  hi = reads_next_word(B) ? *reinterpret_cast<const uint4*>(p + R::kRowStride) : lo;
}

// One 32-row block of width B from ring slot `slot`, its x at `x`.
template <int B, int QN, int MT, typename T>
__device__ __forceinline__ void compute_block(const unsigned char* slot, const unsigned char* x,
                                              int g, int t, const uint2 (&sc)[QN],
                                              const uint2 (&nz)[QN], FragC (&acc)[2 * QN][MT]) {
#pragma unroll
  for (int q = 0; q < QN; ++q) {  // one quad at a time: only its words are live
    uint4 lo, hi;
    quad_words<B, QN>(slot, q, g, t, lo, hi);
    compute_quad<B, QN, MT, T>(q, lo, hi, g, t, sc, nz, x, acc);
  }
}

// The same block for the fold row (mma_fold.cuh): raw codes times x sorted by offset class
// into acc (C), and the block's sum of x into xsum (X).
template <int B, int QN>
__device__ __forceinline__ void compute_block_fold(const unsigned char* slot,
                                                   const unsigned char* x, int g, int t,
                                                   FragC (&acc)[2 * QN][1], FragC& xsum) {
  const FoldB xb = fold_b<B>(x, g, t);
#pragma unroll
  for (int q = 0; q < QN; ++q) {
    uint4 lo, hi;
    quad_words<B, QN>(slot, q, g, t, lo, hi);
    fold_quad<B, QN>(q, lo, hi, t, xb, acc);
  }
  fold_x_sum(xb, xsum);
}

// The fold row's answer for a warp whose x holds an infinity or NaN (mma_fold.cuh): its blocks
// [0, nb) again with the exact decode (compute_quad's: weights as exact fp16 numbers, so that
// an infinite x meets them as in the reference), reading the words, scales and zeros from
// global memory and block i's x (the one row, 16 bytes a lane as in the rings) from x_of(i);
// into acc, from 0, in the exact rows' layout. Invalid blocks are skipped: their tile is NaN.
template <int QN, typename XOf>
__device__ __forceinline__ void exact_range(FragC (&acc)[2 * QN][1], const int2* my_meta, int nb,
                                         const uint32_t* __restrict__ qweight,
                                         const uint16_t* __restrict__ scales,
                                         const uint16_t* __restrict__ zeros, int N, int n_warp,
                                         int g, int t, XOf x_of) {
  fill_acc<1, QN>(acc, 0.f);
  for (int i = 0; i < nb; ++i) {
    const int2 e = my_meta[i];
    const int bits = packed_bits(e), group = packed_group(e);
    const uint4 xb = x_of(i);
    const uint32_t keep = g == 0 ? ~0u : 0u;  // the one row is token 0: B column 0
    const FragB b0{{xb.x & keep, xb.y & keep}}, b1{{xb.z & keep, xb.w & keep}};
    with_width(bits, [&](auto width) {
      constexpr int B = decltype(width)::value;
      if constexpr (B > 0) {
        uint2 sc[QN], nz[QN];
        uint4 lo[QN], hi[QN];
#pragma unroll
        for (int q = 0; q < QN; ++q) {
          const int n = n_warp + 32 * q + 4 * g;  // the lane's 4 columns (N % 8 == 0)
          const bool in = n < N;
          const size_t row = size_t(uint32_t(e.y) + (t * B) / 4) * N + n;
          lo[q] = in ? *reinterpret_cast<const uint4*>(qweight + row) : make_uint4(0, 0, 0, 0);
          hi[q] = in && reads_next_word(B) ? *reinterpret_cast<const uint4*>(qweight + row + N)
                                           : lo[q];
          const size_t gi = size_t(group) * N + n;
          sc[q] = in ? *reinterpret_cast<const uint2*>(scales + gi) : make_uint2(0, 0);
          nz[q] = negate_halves(in ? *reinterpret_cast<const uint2*>(zeros + gi)
                                   : make_uint2(0, 0));
        }
#pragma unroll
        for (int q = 0; q < QN; ++q) {
          BlockA a[2];
          decode_quad<B, QN, __half>(q, lo[q], hi[q], t, sc, nz, a);
#pragma unroll
          for (int k = 0; k < 2; ++k) MmaOp<__half>::run_block(acc[2 * q + k][0], a[k], b0, b1);
        }
      }
    });
  }
}

// Shared memory of a CTA: each warp's ring of STAGES slots, then (CTA_X) the x rings, then the
// block table. A block's x is MT token tiles of 8 tokens x 32 k (64 bytes per token,
// token-major), copied like the weights so that the only waits in the loop are on the rings'
// cp.async groups:
//   CTA_X false: every warp copies its own x, into its slot after the weights
//                  | warp 0: slot 0 [weights | x] slot 1 ... | warp 1 ... | table |
//   CTA_X true:  the CTA's warps (all column warps, one K range) form XG groups (XG = 2: the
//                two warpgroups) of which each shares one x ring, filled by its threads and
//                released by a barrier of the group per block
//                  | warp 0: slot 0 [weights] slot 1 ... | warp 1 ... | group 0: x 0 | x 1 |
//                  ... | group 1: x 0 | ... | table |
//   FOLD:        one row of x, 64 bytes a block: each warp copies the x of kFoldXBlocks blocks
//                at once (one 16-byte copy a lane), a chunk ahead, into one of its two x
//                buffers (the kernel's run loop)
//                  | warp 0: slot 0 [weights] slot 1 ... | warp 1 ... | warp 0: x 0 | x 1 |
//                  warp 1: x 0 | ... | table |
template <int QN, int MT, int STAGES, bool CTA_X, int XG, bool FOLD>
struct Rings {
  static constexpr int kXBytes = MT * 8 * 64;
  static constexpr int kFoldXBlocks = 8;
  static constexpr int kFoldXBytes = kFoldXBlocks * 64;  // 32 lanes x 16 bytes
  static constexpr int kSlotBytes = Slot<QN>::kSlotBytes + (CTA_X || FOLD ? 0 : kXBytes);
  static constexpr int kWarpBytes = STAGES * kSlotBytes;
  static constexpr int kXRing = kWarps * kWarpBytes;
  static constexpr int kBytes = kXRing + (CTA_X ? XG * STAGES * kXBytes : 0) +
                                (FOLD ? kWarps * 2 * kFoldXBytes : 0);
  static constexpr int kXStride = CTA_X ? kXBytes : kSlotBytes;  // from one slot's x to the next
  static constexpr int kGroupThreads = kWarps * 32 / XG;  // CTA_X: the threads sharing a ring
  // CTA_X: the x group of warp `warp` (a constant 0 for one group)
  static __device__ __forceinline__ int x_group(int warp) {
    return XG > 1 ? warp / (kWarps / XG) : 0;
  }
  // offset of slot s's x from the shared memory base, for warp `warp`
  static __device__ __forceinline__ int x_offset(int warp, int s) {
    return CTA_X ? kXRing + (x_group(warp) * STAGES + s) * kXBytes
                 : warp * kWarpBytes + s * kSlotBytes + Slot<QN>::kSlotBytes;
  }
  // FOLD: offset of the x of the warp's block i (counted from its first block)
  static __device__ __forceinline__ int fold_x_offset(int warp, int i) {  // i >= 0
    const unsigned u = unsigned(i);
    return kXRing + (2 * warp + (u / kFoldXBlocks) % 2) * kFoldXBytes + (u % kFoldXBlocks) * 64;
  }
};

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
  // Byte pointers fixed for the kernel, so that a block's copies cost one multiply-add for
  // its first row and one add per further row (address arithmetic was ~40 % of the loop).
  const unsigned char* q_src;   // the lane's chunk in qweight row row0 (of word 0)
  const unsigned char* sz_src;  // its chunk in the scales or zeros row of group 0
  uint32_t q_dst, sz_dst;       // shared addresses in the ring's slot 0 (q_dst: of row 0)
  int row0;
  bool q_ok, sz_ok;             // chunk inside [0, N)

  __device__ __forceinline__ LaneCopies(const uint32_t* qweight, const uint16_t* scales,
                                        const uint16_t* zeros, int N, int n_warp, int lane,
                                        uint32_t ring) {
    const int c = lane % R::kChunks;
    row0 = lane / R::kChunks;
    q_ok = n_warp + 4 * c < N;
    q_src = reinterpret_cast<const unsigned char*>(qweight + size_t(row0) * N +
                                                   (q_ok ? n_warp + 4 * c : 0));
    q_dst = ring + 16 * c + row0 * R::kRowStride;  // + k * kRowStep * kRowStride for row row0 + ...
    constexpr int kHalf = R::kChunks / 2;  // chunks per scales row
    const int which = (lane / kHalf) & 1, c2 = lane % kHalf;
    sz_ok = n_warp + 8 * c2 < N;
    sz_src = reinterpret_cast<const unsigned char*>((which ? zeros : scales) +
                                                    (sz_ok ? n_warp + 8 * c2 : 0));
    sz_dst = ring + R::kSzOffset + which * 2 * R::kCols + 16 * c2;
  }

  // Queue block (bits, word, group) into the slot at byte offset `slot`: rows row0,
  // row0 + kRowStep, ... < bits. B > 0: bits == B, known here, so only the last row of an odd
  // width needs a predicate; B == 0: any width, every row predicated.
  template <int B>
  // N: the kernel argument (read from the parameter bank, not kept in a register).
  __device__ __forceinline__ void issue(uint32_t slot, int bits, int word, int group,
                                        bool new_group, int N) const {
    const uint32_t row_bytes = uint32_t(N) * 4;  // one qweight row
    const unsigned char* src = q_src + size_t(uint32_t(word)) * row_bytes;
    const size_t step = size_t(kRowStep) * row_bytes;
    constexpr int kSteps = B > 0 ? (B + kRowStep - 1) / kRowStep : 8 / kRowStep;
#pragma unroll
    for (int k = 0; k < kSteps; ++k)
      if ((B > 0 && (k + 1) * kRowStep <= B) || row0 + k * kRowStep < (B > 0 ? B : bits))
        cp_async16(slot + q_dst + k * kRowStep * R::kRowStride, src + k * step, q_ok);
    if (new_group && row0 == 0)  // lanes 0 .. kChunks - 1
      cp_async16(slot + sz_dst, sz_src + size_t(uint32_t(group)) * (row_bytes / 2), sz_ok);
  }
};


// ---- the kernel: weights and x through cp.async rings in shared memory ----------------------

// grid: (column tiles, splits); block: kWarps * 32 threads.
// xs: the gathered, scaled, interleaved x [M, K] (gather_x); each block's x rides in its
// ring slot.
// out: splits == 1 -> y [M, N] (T) with bias; else fp32 partials [splits, M, N].
// CTA_X: x rings shared by XG groups of warps (Rings); the caller passes WC == kWarps
// (log2_wc = 3). FOLD: scale after the product (mma_fold.cuh; M == 1, fp16).
template <typename T, int MT, int QN, int STAGES, int MIN_CTAS, bool CTA_X, int XG, bool FOLD>
__global__ void __launch_bounds__(kWarps * 32, MIN_CTAS)
    mma_gemm_kernel(const T* __restrict__ xs, const uint32_t* __restrict__ qweight,
                    const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
                    const int32_t* __restrict__ blocks, const void* __restrict__ bias,
                    int bias_kind, void* __restrict__ out, int M, int K, int N, int R, int G,
                    int log2_wc, int blocks_per_split) {
  static_assert(!FOLD || (std::is_same_v<T, __half> && MT == 1 && !CTA_X),
                "the fold row: one token tile of fp16 x, x per warp");
  using Rg = Slot<QN>;
  using Rx = Rings<QN, MT, STAGES, CTA_X, XG, FOLD>;
  constexpr int kStages = STAGES;
  constexpr int kAhead = kStages - 1;  // blocks in flight during a compute
  // All of the kernel's shared memory, and nothing static besides it: the slot layout's
  // conflict-free reads are counted from this block's start, and a 16-byte __shared__ variable
  // elsewhere in the kernel shifted it, raised bank conflicts by 70 % and took up to 2x the
  // time (benchmarks/2026-12-07_speed_round.md, call 3).
  extern __shared__ __align__(16) unsigned char smem[];
  allow_next_grid();  // the split reduction, if any, may be scheduled
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const WarpPlace place(warp, log2_wc);
  const int n_warp = ((blockIdx.x << log2_wc) + place.wc) * Slot<QN>::kCols;
  const WarpRange r(K, blocks_per_split, place.kw, kLog2Warps - log2_wc);
  const int wb = r.wb, nb = r.nb;
  int2* meta = reinterpret_cast<int2*>(smem + Rx::kBytes);
  stage_table(meta, blocks, r, R, G);
  const int2* my_meta = meta + (wb - r.jb0);
  unsigned char* ring = smem + warp * Rx::kWarpBytes;
  const uint32_t smem_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  // Every lane of the warp (CTA_X: every thread of the CTA) is done with the slot it waited for
  // and read last.
  auto ring_sync = [warp] {
    if constexpr (CTA_X && XG > 1) named_barrier(1 + Rx::x_group(warp), Rx::kGroupThreads);
    else if constexpr (CTA_X) __syncthreads();
    else __syncwarp();
  };

  FragC acc[2 * QN][MT];
  fill_acc<MT, QN>(acc, 0.f);
  // FOLD: the folded sums Y and the group's sum of x X (mma_fold.cuh); acc holds C; whether
  // every group's X was finite
  FragC folded[2 * QN] = {}, xsum = {};
  bool x_finite = true;

  // Producer side: block i's copies go to ring slot i % kStages (kept as rotating indices);
  // scales and zeros only when starts_group says so.
  const LaneCopies<QN> copies(qweight, scales, zeros, N, n_warp, lane,
                              smem_s + warp * Rx::kWarpBytes);
  // x of block i: MT * 32 chunks of 16 bytes, each a quarter (piece) of one token's 32 k,
  // zero-filled for tokens past M. Copier c (lane l: c = l; CTA_X: thread c) takes token
  // c / 4 + kXTokenStep * k, piece c % 4; they land in token order, 64 bytes a token, so a
  // warp writes 512 contiguous bytes.
  constexpr int kXThreads = CTA_X ? Rx::kGroupThreads : 32;  // threads that copy x
  constexpr int kXCopies = (32 * MT + kXThreads - 1) / kXThreads;  // chunks a thread copies
  constexpr int kXTokenStep = kXThreads / 4;                // tokens from one copy to the next
  const int x_chunk = !CTA_X ? lane : XG > 1 ? int(threadIdx.x) % kXThreads : int(threadIdx.x);
  const bool x_copier = x_chunk < 32 * MT;
  const int x_token = x_chunk / 4, x_piece = x_chunk % 4;
  // slot 0 (FOLD: x buffer 0)
  const uint32_t x_dst =
      smem_s + (FOLD ? Rx::fold_x_offset(warp, 0) : Rx::x_offset(warp, 0)) + 16 * x_chunk;
  // the slot's x bytes from one copy to the next
  constexpr uint32_t kXDstStep = kXThreads * 16;
  // element offsets into xs, one register each (M * K < 2^32: M <= 64)
  uint32_t x_src[kXCopies];
#pragma unroll
  for (int k = 0; k < kXCopies; ++k)
    x_src[k] = FOLD ? uint32_t(wb) * kBlockRows + 8 * x_chunk  // token 0, lane's 16 bytes
                    : uint32_t(min(x_token + kXTokenStep * k, M - 1)) * uint32_t(K) +
                          uint32_t(wb) * kBlockRows + 8 * x_piece;
  // FOLD: the x of blocks 8c .. 8c + 7 into buffer c % 2, lane l block 8c + l / 4 (zero-filled
  // past the warp's range)
  static_assert(!FOLD || Rx::kFoldXBlocks == 8, "fold_x_chunk's block arithmetic");
  auto fold_x_chunk = [&](int c) {
    cp_async16(x_dst + (c & 1) * Rx::kFoldXBytes, xs + (x_src[0] + uint32_t(c) * 8 * kBlockRows),
               8 * c + lane / 4 < nb);
  };
  int issue_group = -1;
  // Block i's weights into ring slot `slot`; width B when the caller knows it (0: read from the
  // table). issue_x: its x (every row but the fold row's, whose x comes in chunks).
  auto issue_weights = [&](auto width, int i, int slot) {
    constexpr int B = decltype(width)::value;
    const int2 e = my_meta[i];
    const int bits = B > 0 ? B : packed_bits(e), group = packed_group(e);
    const bool new_group = starts_group(bits, group, issue_group);
    copies.template issue<B>(slot * Rx::kSlotBytes, bits, e.y, group, new_group, N);
  };
  auto issue_x = [&](int i, int slot) {
    if (!x_copier) return;
#pragma unroll
    for (int k = 0; k < kXCopies; ++k)
      cp_async16(x_dst + slot * Rx::kXStride + kXDstStep * k,
                 xs + (x_src[k] + uint32_t(i) * kBlockRows), x_token + kXTokenStep * k < M);
  };
  // The first blocks' weights are queued before waiting for the kernel that writes xs
  // (programmatic dependent launch: this grid may start while the x gather runs, which
  // allows it only once every kernel before it has finished);
  // slot s's copies then complete with cp.async group s (group 0 also holds the others'
  // weights).
  for (int s = 0; s < kAhead && s < nb; ++s) issue_weights(Width<0>{}, s, s);
  wait_prior_grid();
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if constexpr (FOLD) {
      if (s == 0) fold_x_chunk(0);  // blocks 0 .. 7, with block 0
    } else if (s < nb) {
      issue_x(s, s);
    }
    cp_async_commit();
  }

  // the lane's 4*QN scales and -zeros (FOLD: zeros) in fp16, this block's group
  uint2 sc[QN], nz[QN];
  if constexpr (FOLD)    // the first group's fold adds 0 * 0
    for (int q = 0; q < QN; ++q) sc[q] = nz[q] = make_uint2(0u, 0u);
  int cur_group = -1;
  int slot_c = 0, slot_i = kAhead;  // ring slots of the block computed / issued next
  // Blocks [i0, i1), a run of width B (0: invalid entries, which only keep the ring going).
  // Each step waits for block i, then refills with block i + kAhead the slot that every lane
  // finished in the previous step. Issues inside the run know the width too; the last kAhead
  // issue the next run's.
  auto run = [&](auto width, int i0, int i1) {
    constexpr int B = decltype(width)::value;
    auto step = [&](int i) {
      cp_async_wait<kAhead - 1>();
      ring_sync();
      const int n = i + kAhead;
      if (n < i1) issue_weights(width, n, slot_i);
      else if (n < nb) issue_weights(Width<0>{}, n, slot_i);
      if (!FOLD && n < nb) issue_x(n, slot_i);
      slot_i = slot_i + 1 == kStages ? 0 : slot_i + 1;
      cp_async_commit();

      const unsigned char* slot = ring + slot_c * Rx::kSlotBytes;
      const int x_off = FOLD ? Rx::fold_x_offset(warp, i) : Rx::x_offset(warp, slot_c);
      slot_c = slot_c + 1 == kStages ? 0 : slot_c + 1;
      if constexpr (B > 0) {
        if (starts_group(B, packed_group(my_meta[i]), cur_group)) {
          if constexpr (FOLD) fold_group<QN>(acc, xsum, sc, nz, t, folded, x_finite);
#pragma unroll
          for (int q = 0; q < QN; ++q) {
            sc[q] = *reinterpret_cast<const uint2*>(slot + Rg::kSzOffset + 64 * q + 8 * g);
            const uint2 z = *reinterpret_cast<const uint2*>(
                slot + Rg::kSzOffset + 2 * Rg::kCols + 64 * q + 8 * g);
            nz[q] = FOLD ? z : negate_halves(z);  // the fold negates in its fma
          }
        }
        if constexpr (FOLD) compute_block_fold<B, QN>(slot, smem + x_off, g, t, acc, xsum);
        else compute_block<B, QN, MT, T>(slot, smem + x_off, g, t, sc, nz, acc);
      } else {
        cur_group = -1;
      }
    };
    if constexpr (FOLD) {
      // in chunks of 8 blocks, so that the next chunk's x is copied once per chunk, outside the
      // block loop (inside it ptxas predicates the copy and every block pays for it): the
      // chunk's group completes long before block 8c + 8 waits for it, and its buffer held
      // chunk c - 1, which every lane has finished (the warp barrier)
      for (int i = i0; i < i1;) {
        const int stop = min(i1, (i | 7) + 1);
        if ((i & 7) == 0) {
          __syncwarp();
          fold_x_chunk((i >> 3) + 1);
        }
        for (; i < stop; ++i) step(i);
      }
    } else {
      for (int i = i0; i < i1; ++i) step(i);
    }
  };
  for (int i = 0; i < nb;) {
    // the run of blocks of i's width: it ends at the first differing entry, 32 at a time
    const int bits = packed_bits(my_meta[i]);
    int j = i + 1;
    for (;;) {
      const int k = j + lane;
      const unsigned m = __ballot_sync(~0u, k >= nb || packed_bits(my_meta[k]) != bits);
      if (m) {
        j += __ffs(m) - 1;
        break;
      }
      j += 32;
    }
    with_width(bits, [&](auto width) { run(width, i, j); });
    i = j;
  }
  cp_async_wait<0>();
  if constexpr (FOLD) {  // the last group, then the classes' weights (mma_fold.cuh)
    fold_group<QN>(acc, xsum, sc, nz, t, folded, x_finite);
    if (__all_sync(~0u, x_finite)) {
      fold_finish<QN>(folded, t, acc);
    } else {  // an infinity or NaN in the warp's x: the exact decode (mma_fold.cuh)
      exact_range<QN>(acc, my_meta, nb, qweight, scales, zeros, N, n_warp, g, t, [&](int i) {
        return *reinterpret_cast<const uint4*>(xs + (uint32_t(wb + i) * kBlockRows + 8 * t));
      });
    }
  }
  // An invalid table entry in the warp's range makes its tile NaN; found again here rather
  // than flagged in the loop, so that no register is held for it there.
  bool poisoned = false;
  for (int k = lane; k < nb; k += 32) poisoned |= packed_bits(my_meta[k]) == 0;
  poisoned = __any_sync(~0u, poisoned);
  finish_tile<T, MT, QN>(acc, poisoned, smem, log2_wc, bias, bias_kind, out, M, N);
}

// One launch of configuration I of kMmaConfigs (plan.h): MT token tiles, QN quads per lane,
// STAGES ring slots per warp, the CTAs per SM its registers are sized for and where x goes
// (CTA_X: a ring per XG warps). Shared memory per CTA: the rings and the block table (8 KB),
// or the k-warps' partial sums where those are larger:
//   MT = 1: QN 2, 4 stages, x per warp (8 x 4 x 3072 + 8 KB = 104 KB)
//   MT = 2: QN 2, 3 stages, x per warp (8 x 3 x 3584 + 8 KB = 92 KB)
//   MT = 4: QN 2, 3 stages, x per warpgroup (8 x 3 x 2560 + 2 x 3 x 2 KB + 8 KB = 80 KB)
//   MT = 8, fp16 (one CTA per SM: 233 registers): QN 2, 3 stages, x per CTA
//           (8 x 3 x 2560 + 3 x 4 KB + 8 KB = 80 KB)
//   MT = 4 and 8 with one quad: QN 1, 5 stages, x per warpgroup / CTA
//           (8 x 5 x 1408 + 2 x 5 x 2 KB / 5 x 4 KB + 8 KB = 83 KB)
//   FOLD (one row): QN 2, 4 stages, x in chunks of 8 blocks (8 x 4 x 2560 + 8 x 1 KB + 8 KB =
//           96 KB)
// The grid (column warps, K splits) is mma_grid's choice for the CTAs the device holds.
template <typename T, int I>
void run_config(const Call<T>& c) {
  constexpr MmaConfig cfg = kMmaConfigs[I];
  constexpr int MT = cfg.mt, QN = cfg.qn, STAGES = cfg.stages, MIN_CTAS = cfg.min_ctas,
                XG = cfg.xg;
  constexpr bool CTA_X = cfg.cta_x, FOLD = cfg.fold;
  const int M = c.xs.size(0), K = c.xs.size(1), N = c.qweight.size(1);
  const int nblocks = K / kBlockRows;
  auto kernel = mma_gemm_kernel<T, MT, QN, STAGES, MIN_CTAS, CTA_X, XG, FOLD>;
  const size_t rings = Rings<QN, MT, STAGES, CTA_X, XG, FOLD>::kBytes;
  const size_t table = kMmaMaxBlocksPerCta * sizeof(int2);  // longer K ranges are split
  // finish_tile: the sums of the kWarps - WC warps that are not k-warp 0, for the fewest column
  // warps the grid may take (1 where MBWQ_MMA_WC may force any count)
  int min_wc = cfg.wc_knob ? 1 : kWarps;
  for (const int wc : cfg.wc_options)
    if (wc > 0) min_wc = std::min(min_wc, wc);
  const size_t red = size_t(kWarps - min_wc) * 2 * QN * MT * 4 * 32 * sizeof(float);
  const size_t smem = std::max(rings + table, red);
  static int ctas_per_sm[64] = {};
  const int slots = resident_ctas(ctas_per_sm, kernel, smem);
  const Grid grid = mma_grid(cfg, nblocks, N, M, double(c.qweight.numel()) * 4, slots, knobs());
  launch_on_grid(kernel, grid, smem, c);
}

template <int I>
using ConfigIndex = std::integral_constant<int, I>;  // a row of kMmaConfigs, as a type

template <typename T>
void launch(const at::Tensor& xs, const at::Tensor& qweight, const at::Tensor& scales,
            const at::Tensor& zeros, const at::Tensor& blocks,
            const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int M = xs.size(0);
  const at::Tensor bias_t = bias.has_value() ? aux_tensor(*bias) : at::Tensor();
  const Call<T> c{
      xs, qweight, scales, zeros, blocks,
      bias_t.defined() ? bias_t.data_ptr() : nullptr,
      bias_t.defined() ? aux_kind(bias_t) : kAuxNone,
      y.data_ptr(), c10::cuda::getCurrentCUDAStream()};
  // Token tiles and quads per lane by M, N and dtype: the table in plan.h. bf16 never takes
  // an fp16-only configuration (its wider decode does not fit the registers, or the fold's
  // subnormal codes are fp16 numbers), so those are not compiled for it.
  static_assert(kNumMmaConfigs == 7, "one case per configuration of kMmaConfigs");
  const bool half = std::is_same_v<T, __half>;
  auto run = [&](auto index) {
    constexpr int I = decltype(index)::value;
    if constexpr (!kMmaConfigs[I].fp16_only || std::is_same_v<T, __half>) run_config<T, I>(c);
    else TORCH_CHECK(false, "mbwq: internal: fp16-only mma.sync configuration for bf16");
  };
  switch (select_mma_config(M, c.qweight.size(1), half, knobs())) {
    case 0: return run(ConfigIndex<0>{});
    case 1: return run(ConfigIndex<1>{});
    case 2: return run(ConfigIndex<2>{});
    case 3: return run(ConfigIndex<3>{});
    case 4: return run(ConfigIndex<4>{});
    case 5: return run(ConfigIndex<5>{});
    case 6: return run(ConfigIndex<6>{});
  }
  TORCH_CHECK(false, "mbwq: internal: no mma.sync configuration for M = ", M);
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

void gemm_mma(const at::Tensor& xs, const at::Tensor& qweight, const at::Tensor& scales,
              const at::Tensor& zeros, const at::Tensor& blocks,
              const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t M = xs.size(0);
  TORCH_CHECK(M >= 1 && M <= kMmaMaxM, "mbwq: internal: tensor-core path needs 1 <= M <= ",
              kMmaMaxM, ", got M = ", M);
  TORCH_CHECK(mma_supported(xs, qweight, scales, zeros),
              "mbwq: internal: tensor-core path called with unsupported arguments");
  if (xs.scalar_type() == at::kHalf) {
    launch<__half>(xs, qweight, scales, zeros, blocks, bias, y);
  } else {
    launch<__nv_bfloat16>(xs, qweight, scales, zeros, blocks, bias, y);
  }
}

}  // namespace cuda
}  // namespace mbwq
