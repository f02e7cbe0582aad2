// Tensor-core GEMM for many tokens on Hopper (sm_90a): y^T [N, M] = W^T [N, K] . xs^T [K, M],
// every weight decoded once per tile of TOKENS (16, 32, 64, 128 or 256) tokens, reading the
// stored qweight directly.
//
// A CTA computes a tile of 128 * RS columns x TOKENS tokens (RS = min(4, 256 / TOKENS) row sets:
// the accumulators of 256 tokens x 128 columns, or fewer with the most A registers) over
// its range of 32-row blocks of K. Its warps have one role each (warp specialization) and hand
// blocks over through a ring of shared-memory slots guarded by mbarriers:
//
//   producers (warps 8-10)   for every block: wait until its slot is empty, then bulk-copy
//                            (cp.async.bulk, the copy engine) the block's x (TOKENS tokens x
//                            32 k, four 16-byte pieces a token, from gather_x's XOrder::kTile)
//                            and the scales and zeros where a group starts (warp 8), its even
//                            (warp 9) and odd (warp 10) qweight rows of the tile's columns; the
//                            slot's "full" barrier counts their arrivals and the bytes
//   consumers (warps 0-7,    warpgroup c takes columns 64 RS c .. 64 RS (c + 1) - 1; for every
//   two warpgroups)          block: wait for the full slot, decode 16 RS weights a lane into
//                            wgmma's A registers, issue 2 RS wgmma m64nTOKENSk16 (RS row sets
//                            x the block's two k-steps) as one group, wait for the previous
//                            block's group and mark that block's slot empty (every thread
//                            arrives: its loads of the slot come before the next copy into it)
//
// So the copies run up to kStages - 1 blocks ahead of the products, and the decode of one block
// runs while the previous block's products do (two A register sets, alternating). The decode and
// the A fragment are those of the other tensor-core kernels (mma_decode.cuh). Warp w of
// warpgroup c takes the 16 RS columns from col0 = 64 RS c + 16 RS w; lane (g, t) 2 RS of them
// in runs of adjacent columns, row set k the pair at set_col(k) = 32 (k / 2) + 2 (k % 2) from
// the lane's first (A row g, then A row g + 8):
//
//   RS = 1 (256 tokens):  lane columns col0 + 2g + {0, 1}                     one 2-column run
//   RS = 2 (128 tokens):  col0 + 4g + {0 1 | 2 3}  (row set 0 | 1)            one 4-column run
//   RS = 4 (16-64 tok.):  col0 + 4g + {0 1 | 2 3},  col0 + 32 + 4g + {0 1 | 2 3}   two runs
//
// So a run's words of a qweight row are one load of 8 or 16 bytes, each quarter warp's loads on
// distinct banks with the rows' stride below (one 8-column run a lane at RS = 4 would be two
// loads 32 bytes apart: 2-way conflicts), and a token's accumulators of a run one store.
//
// Slot (bytes):
//   | x: piece 0 (TOKENS x 16 B) .. piece 3 (wgmma.cuh's B layout) | qweight rows 0..7 of the
//     block, kRowStride apart | scales (kCols fp16) | zeros (kCols fp16) |
//   rows kRowStride = 32 mod 128 bytes apart, so that the lanes' loads of rows (t * B) / 4 hit
//   distinct banks for widths 2-5.
//
// The shapes trade L2 traffic for decode work: 128 x 256 reads 16 KB of x and 2 KB of 4-bit
// weights per block, 256 x 128 8 KB and 4 KB, 512 x 64 4 KB and 8 KB (512 x 32 and 512 x 16:
// 2 and 1 KB of x), and each halving of the tokens doubles the weights decoded per product.
//
// Invalid block-table entries (bits 0 after load_block) get no copies and make the CTA's tile
// NaN. Several K splits (few tiles on the device) write fp32 partials that reduce_splits adds in
// order, as on the other path: results do not depend on timing.
//
// Schedules (plan.h: Grid). A grid of (token tiles, column tiles, K splits) gives each CTA one
// piece of work. When the tiles leave the last wave part empty (224 tiles on 132 SMs run as two
// waves of which the second is 70 % full), stream-K lays the tiles' blocks end to end and
// gives each of `ctas` persistent CTAs an equal run of them:
//
//   units:  | tile 0: blocks 0 .. nb-1  | tile 1: blocks 0 .. nb-1  | tile 2 ...
//   CTAs:   | CTA 0        | CTA 1                   | CTA 2          ...
//   pieces: | t0 [0, a)    | t0 [a, nb) | t1 [0, b) | t1 [b, nb)  ...
//
// A CTA walks its run piece by piece, a piece ending at a tile edge, with one ring and one
// block count throughout (the copies of the next piece run ahead of the current one's
// epilogue). A piece that covers a whole tile writes y; the first and the last piece of a CTA
// may cover part of one, and write fp32 partials to slots 2p and 2p + 1, which
// stream_fixup_kernel adds in CTA order.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>

#include "../format.h"
#include "common.cuh"
#include "launch.h"
#include "mma_decode.cuh"
#include "mma_tile.cuh"
#include "pdl.cuh"
#include "split_reduce.cuh"
#include "wgmma.cuh"

namespace mbwq {
namespace cuda {
namespace {

// Two consumer warpgroups and one producer warpgroup, of which kProducerWarps warps copy;
// setmaxnreg moves the producers' registers to the consumers: 4 x 32 x 40 + 8 x 32 x 232 =
// 64512 of the 65536 (128 accumulators and two A register sets of 8 RS). Three consumer
// warpgroups of two row sets were slower on every shape measured (benchmarks/).
constexpr int kConsumerWarps = 8;
constexpr int kThreads = 32 * kConsumerWarps + 128;
constexpr int kConsumerRegs = 232;
constexpr int kProducerRegs = 40;
constexpr int kMaxStages = 12;
// Warps that issue copies (Nsight Compute, 8192 x 28672 4-bit M = 2048: with one warp issuing
// all of a block's copies, the consumers spent half their stall cycles waiting for full slots
// while that warp was never held back by an empty one)
constexpr int kProducerWarps = 3;
constexpr int kSmemLimit = 227 * 1024;

// Geometry of a tile of TOKENS tokens x 128 RS columns (RS row sets of 64 columns for each
// of the two consumer warpgroups).
template <int TOKENS, int RS>
struct TileShape {
  static constexpr int kRowSets = RS;
  static constexpr int kCols = 128 * kRowSets;                     // columns per CTA
  static constexpr int kPiece = TOKENS * 16;                       // one x piece in a slot
  static constexpr int kXBytes = 4 * kPiece;  // = one block of xs (XOrder::kTile, H = TOKENS)
  static constexpr int kRowBytes = kCols * 4;                      // one qweight row
  static constexpr int kRowStride = kRowBytes + 32;
  static constexpr int kWOffset = kXBytes;
  static constexpr int kSzOffset = kWOffset + 8 * kRowStride;      // scales, then zeros
  static constexpr int kSlotBytes = (kSzOffset + 4 * kCols + 127) / 128 * 128;
  static constexpr int kStages = std::min(kMaxStages, (kSmemLimit - 256) / kSlotBytes);
  // A lane's columns: runs of kRunCols adjacent columns, 32 apart (header)
  static constexpr int kRunCols = kRowSets == 1 ? 2 : 4;
  static constexpr int kRuns = 2 * kRowSets / kRunCols;
  // Offset of row set k's first column (A row g; A row g + 8 takes the next) from the lane's
  // first column.
  static __device__ __forceinline__ constexpr int set_col(int k) {
    return 32 * (k / 2) + 2 * (k % 2);
  }
  static constexpr int kBarrierOffset = kStages * kSlotBytes;     // full[], then empty[]
  static constexpr int kSmemBytes = kBarrierOffset + 2 * kStages * 8;
  static_assert(kSmemBytes <= kSmemLimit, "gemm_tile: shared memory");
};

// ---- mbarrier and bulk-copy PTX (sm_90; the kernel runs on compute capability 9.0 only) ----

// Registers per thread of this warpgroup from here on (sm_90a; all its threads execute it).
template <int N>
__device__ __forceinline__ void set_max_regs_dec() {
  MBWQ_WGMMA_ASM("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void set_max_regs_inc() {
  MBWQ_WGMMA_ASM("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  MBWQ_WGMMA_ASM("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Arrive once and expect `bytes` more from bulk copies in this phase.
__device__ __forceinline__ void mbar_arrive_expect(uint32_t bar, uint32_t bytes) {
  MBWQ_WGMMA_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  MBWQ_WGMMA_ASM("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Wait until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  MBWQ_WGMMA_ASM(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n"
      ::"r"(bar), "r"(parity)
      : "memory");
}
// `bytes` (a multiple of 16) from global `src` to shared `dst` (both 16-byte aligned) on the
// copy engine; completion is counted on `bar`.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  MBWQ_WGMMA_ASM(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// The CTA's block-table entries as a warp walks them in order, 32 at a time: lane l holds
// entry c + l of the current chunk of 32 (checked) and of the next one (as read, a chunk ahead),
// so that a block costs shuffles instead of a global load that the loop waits for (no
// measurable change at M = 2048, where the copy warps set the pace; the shorter dependency
// chain was kept).
struct TableChunks {
  int jb0, nb;
  BlockMeta cur, nxt;

  // blocks, R, G: the kernel's arguments, passed on every call rather than kept here (the copy
  // warps have 40 registers)
  __device__ __forceinline__ TableChunks(const int32_t* blocks, int jb0_, int nb_, int R, int G)
      : jb0(jb0_), nb(nb_) {
    cur = check_block(fetch(blocks, 0), R, G);
    nxt = fetch(blocks, 32);
  }
  __device__ __forceinline__ BlockMeta fetch(const int32_t* blocks, int c) const {
    const int k = c + int(threadIdx.x % 32);
    return k < nb ? block_entry(blocks, jb0 + k) : BlockMeta{0, 0, 0};
  }
  // Entry i (0 <= i < nb); every lane calls this for i = 0, 1, 2, ... in turn.
  __device__ __forceinline__ BlockMeta get(int i, const int32_t* blocks, int R, int G) {
    if ((i & 31) == 0 && i > 0) {
      cur = check_block(nxt, R, G);
      nxt = fetch(blocks, i + 32);
    }
    const int l = i & 31;
    return BlockMeta{__shfl_sync(~0u, cur.bits, l), __shfl_sync(~0u, cur.word, l),
                     __shfl_sync(~0u, cur.group, l)};
  }
};

// ---- the schedule ------------------------------------------------------------------------

// The pieces of every CTA (header: Schedules): the (mtiles, ntiles, splits) grid, one piece a
// CTA, or stream-K (plan.h: StreamK, whose rules these are).
// StreamK's fields are copied in, not held as a member: nvcc 13.0's cicc crashed (segfault)
// on this kernel with a struct-valued member in its parameter.
struct Schedule {
  int bps;  // grid: blocks per split
  int mtiles, nblocks, ctas, q, r;  // StreamK's fields (mtiles and nblocks in both)

  __device__ __forceinline__ StreamK sk() const { return StreamK{mtiles, nblocks, ctas, q, r}; }
  // The CTA's pieces in turn: u = start() before the first call, then advanced by each;
  // false when there are no more. Nothing else is carried from one call to the next (the copy
  // warps have 40 registers).
  template <bool STREAM>
  __device__ __forceinline__ int start() const { return STREAM ? sk().first_unit(blockIdx.x) : 0; }
  template <bool STREAM>
  __device__ __forceinline__ bool next_piece(int& u, TilePiece& pc) const {
    if constexpr (!STREAM) {  // the grid: one piece
      if (u > 0) return false;
      u = 1;
      pc.mtile = blockIdx.x, pc.ntile = blockIdx.y, pc.jb0 = blockIdx.z * bps;
      pc.nb = max(0, min(bps, nblocks - pc.jb0));
      pc.part = gridDim.z == 1 ? -1 : int(blockIdx.z);
      return true;
    } else {
      return sk().next(blockIdx.x, u, pc);
    }
  }
};

// ---- the kernel --------------------------------------------------------------------------

// grid: (token tiles, column tiles, K splits), or (sch.ctas) for stream-K (STREAM); block:
// kThreads.
// xs: x gathered in XOrder::kTile with tiles of TOKENS rows;
// y [M, N] (T): the pieces that cover a whole tile, with bias;
// part: the other pieces' fp32 partials: grid [splits, M, N], stream-K [2 ctas, TOKENS, kCols].
// RS: the row sets (a template parameter, not a local constant: cicc crashed on the lambdas'
// array bounds of a local one).
template <typename T, int TOKENS, int RS, bool STREAM>
__global__ void __launch_bounds__(kThreads, 1)
    tile_gemm_kernel(const T* __restrict__ xs, const uint32_t* __restrict__ qweight,
                     const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
                     const int32_t* __restrict__ blocks, const void* __restrict__ bias,
                     int bias_kind, T* __restrict__ y, float* __restrict__ part, int M, int K,
                     int N, int R, int G, Schedule sch) {
#if MBWQ_WGMMA
  using S = TileShape<TOKENS, RS>;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t full0 = smem_s + S::kBarrierOffset, empty0 = full0 + 8 * S::kStages;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nblocks = K / kBlockRows;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S::kStages; ++s) {
      mbar_init(full0 + 8 * s, kProducerWarps);  // the producers' arrives (+ copied bytes)
      // every consumer thread arrives once its own reads of the slot are done (an arrive by
      // one lane per warp left the other lanes' loads unordered before the next copy:
      // compute-sanitizer racecheck)
      mbar_init(empty0 + 8 * s, kConsumerWarps * 32);
    }
    MBWQ_WGMMA_ASM("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  allow_next_grid();  // the split reduction, if any, may be scheduled

  if (warp >= kConsumerWarps) {
    // ---- producers: the first warp after the consumers copies x (and the scales and zeros
    // where a group starts), the next two the even and odd qweight rows; the last one only
    // gives its registers away ----
    set_max_regs_dec<kProducerRegs>();
    const int role = warp - kConsumerWarps;
    if (role >= kProducerWarps) return;
    const size_t row_bytes = size_t(N) * 4;
    if (role == 0) wait_prior_grid();  // xs comes from the gather kernel
    int gi = 0;  // blocks copied so far, over all pieces: the ring position
    TilePiece pc;
    for (int u = sch.start<STREAM>(); sch.next_piece<STREAM>(u, pc);) {
      const int n0 = pc.ntile * S::kCols;
      const uint32_t cols_bytes = uint32_t(min(S::kCols, N - n0)) * 4;  // N % 8 == 0: x 32
      // block jb0 of this tile's tokens in xs
      const unsigned char* x = reinterpret_cast<const unsigned char*>(xs) +
                               (size_t(pc.mtile) * nblocks + pc.jb0) * S::kXBytes;
      TableChunks table(blocks, pc.jb0, pc.nb, R, G);
      int last_group = -1;  // a piece starts with its columns' scales
      for (int i = 0; i < pc.nb; ++i, ++gi, x += S::kXBytes) {
        const int s = gi % S::kStages, use = gi / S::kStages;
        const BlockMeta b = table.get(i, blocks, R, G);
        const bool new_group = starts_group(b.bits, b.group, last_group);
        if (lane == 0) {  // one thread of each producer warp issues its copies
          if (use > 0) mbar_wait(empty0 + 8 * s, (use - 1) & 1);
          const uint32_t slot = smem_s + s * S::kSlotBytes, full = full0 + 8 * s;
          if (b.bits == 0) {
            mbar_arrive(full);  // nothing to copy; the consumers poison the piece
          } else if (role == 0) {
            mbar_arrive_expect(full, S::kXBytes + (new_group ? cols_bytes : 0));
            bulk_copy(slot, x, S::kXBytes, full);
            if (new_group) {
              const size_t sz = size_t(b.group) * N + n0;
              bulk_copy(slot + S::kSzOffset, scales + sz, cols_bytes / 2, full);
              bulk_copy(slot + S::kSzOffset + 2 * S::kCols, zeros + sz, cols_bytes / 2, full);
            }
          } else {
            const int r0 = role - 1, rows = (b.bits - r0 + 1) / 2;  // rows r0, r0 + 2, .. < bits
            mbar_arrive_expect(full, rows * cols_bytes);
            const unsigned char* src = reinterpret_cast<const unsigned char*>(qweight + n0) +
                                       (size_t(b.word) + r0) * row_bytes;
            uint32_t dst = slot + S::kWOffset + r0 * S::kRowStride;
            for (int r = 0; r < rows; ++r, src += 2 * row_bytes, dst += 2 * S::kRowStride)
              bulk_copy(dst, src, cols_bytes, full);
          }
        }
        __syncwarp();
      }
    }
  } else {
    // ---- consumers ----
    set_max_regs_inc<kConsumerRegs>();
    const int g = lane / 4, t = lane % 4;
    int col = 64 * RS * (warp / 4) + 16 * RS * (warp % 4) + S::kRunCols * g;  // lane's first
    // Kept in a register (an empty asm that "changes" it), not recomputed from the thread index
    // in every block's slot addresses, where the accumulators and the two A register sets
    // leave room: 4-bit 256-token tiles 225 -> 207 instructions per two blocks; the 64-token
    // tiles of four row sets (192 such registers) spill with it.
    if constexpr (RS * TOKENS / 2 + 16 * RS <= 160) asm volatile("" : "+r"(col));
    float acc[RS][TOKENS / 8][4];
    // A registers of alternate blocks; zero once, so that an invalid block, which leaves them
    // as they are (its tile is NaN anyway), never multiplies uninitialized registers
    BlockA a0[RS] = {}, a1[RS] = {};
    __half2 sc[RS][2], nz[RS][2];   // scale and -zero of row set k's two columns, (v, v) pairs
    int cur_group = -1, pending = -1;  // pending: slot of the last committed group
    bool poisoned = false;

    // The lane's A registers of a block of width B from its slot (B = 0: an invalid block,
    // whose slot holds no weights: a keeps an earlier block's values and the tile becomes
    // NaN; zeroing a here cost ~16 instructions in every valid block, where ptxas hoisted it).
    auto decode = [&](auto width, const unsigned char* slot, BlockA(&a)[RS]) {
      constexpr int B = decltype(width)::value;
      if constexpr (B == 0) {
        poisoned = true;
      } else {
        const unsigned char* w = slot + S::kWOffset + ((t * B) >> 2) * S::kRowStride + 4 * col;
        uint32_t lo[2 * RS], hi[2 * RS];  // words of row set k: [2k] (A row g), [2k + 1]
        if constexpr (RS == 1) {
          const uint2 l = *reinterpret_cast<const uint2*>(w);
          const uint2 h = reads_next_word(B) ? *reinterpret_cast<const uint2*>(w + S::kRowStride)
                                             : l;
          lo[0] = l.x, lo[1] = l.y, hi[0] = h.x, hi[1] = h.y;
        } else {
#pragma unroll
          for (int r = 0; r < S::kRuns; ++r) {  // run r: row sets 2r, 2r + 1, 128 bytes on
            const uint4 l = *reinterpret_cast<const uint4*>(w + 128 * r);
            const uint4 h = reads_next_word(B)
                                ? *reinterpret_cast<const uint4*>(w + 128 * r + S::kRowStride)
                                : l;
            lo[4 * r] = l.x, lo[4 * r + 1] = l.y, lo[4 * r + 2] = l.z, lo[4 * r + 3] = l.w;
            hi[4 * r] = h.x, hi[4 * r + 1] = h.y, hi[4 * r + 2] = h.z, hi[4 * r + 3] = h.w;
          }
        }
#pragma unroll
        for (int k = 0; k < RS; ++k)
          decode_columns<B, T>(lo[2 * k], hi[2 * k], lo[2 * k + 1], hi[2 * k + 1], t, sc[k][0],
                               nz[k][0], sc[k][1], nz[k][1], a[k]);
      }
    };
    // Block i of the piece (ring position gi): decode into a, its products into acc as one
    // group, then wait for the group before (which read a_prev) and release that group's slot.
    // One loop for every width, the decode switching per block: with a loop per width, ptxas
    // serialized every wgmma (C7512).
    const uint64_t x_desc0 = smem_desc(smem_s, S::kPiece, 128);
    auto step = [&](TableChunks& table, int i, int gi, BlockA(&a)[RS], BlockA(&a_prev)[RS]) {
      const BlockMeta b = table.get(i, blocks, R, G);
      const int s = gi % S::kStages;
      const bool new_group = starts_group(b.bits, b.group, cur_group);
      mbar_wait(full0 + 8 * s, (gi / S::kStages) & 1);
      const unsigned char* slot = smem + s * S::kSlotBytes;
      if (new_group) {
#pragma unroll
        for (int k = 0; k < RS; ++k) {
          const int c = col + S::set_col(k);
          const uint32_t v = *reinterpret_cast<const uint32_t*>(slot + S::kSzOffset + 2 * c);
          const uint32_t z = *reinterpret_cast<const uint32_t*>(slot + S::kSzOffset +
                                                               2 * S::kCols + 2 * c) ^
                             0x80008000u;
          sc[k][0] = dup_half(v, 0), sc[k][1] = dup_half(v, 1);
          nz[k][0] = dup_half(z, 0), nz[k][1] = dup_half(z, 1);
        }
      }
      with_width(b.bits, [&](auto width) { decode(width, slot, a); });
      // slot s's x pieces: slot 0's descriptor + the offset in its start-address field (in 16
      // bytes; shared addresses < 256 KB never carry out of its 14 bits), one add instead of
      // building each descriptor from the address (4 uniform instructions a wgmma)
      const uint32_t x_off = (s * S::kSlotBytes) >> 4;
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < RS; ++k)
#pragma unroll
        for (int ks = 0; ks < 2; ++ks)
          wgmma_tokens<T, TOKENS>(&acc[k][0][0], a[k].step[ks],
                                  x_desc0 + (x_off + ks * (2 * S::kPiece >> 4)));
      wgmma_commit();
      wgmma_wait<1>();
#pragma unroll
      for (int k = 0; k < RS; ++k) wgmma_operand_done(a_prev[k]);
      if (pending >= 0) mbar_arrive(empty0 + 8 * pending);
      pending = s;
    };

    // Epilogue of a piece. acc[k][j][e]: token 8j + 2t + (e & 1), column col + set_col(k) +
    // (e >> 1); value c = 2k + e' of a token is column col + set_col(c / 2) + c % 2, so run r
    // holds values kRunCols r .. kRunCols (r + 1) - 1, adjacent columns (one store). A whole
    // tile goes to y with the bias, a part of one to its partial slot.
    auto store = [&](const TilePiece& pc) {
      const int n0 = pc.ntile * S::kCols, n = n0 + col;
      if (n >= N) return;  // N % 8 == 0: a run's columns are all in or all out
      const bool to_y = pc.part < 0;
      auto column = [&](int c) { return n + S::set_col(c / 2) + c % 2; };
      float bv[2 * RS] = {};
      if (to_y && bias_kind != kAuxNone)
#pragma unroll
        for (int c = 0; c < 2 * RS; ++c)
          if (c < S::kRunCols || column(c) < N) bv[c] = aux_load(bias, bias_kind, column(c));
      // partials: grid [splits, M, N]; stream-K [slots, TOKENS, kCols], a tile's own rows and
      // columns (element (m, nr) of slot `part` at part_base + m * part_ld + nr)
      const int m_tile = pc.mtile * TOKENS;
      const int64_t part_ld = STREAM ? S::kCols : N;
      const int64_t part_base = STREAM ? (int64_t(pc.part) * TOKENS - m_tile) * S::kCols - n0
                                       : int64_t(pc.part) * M * N;
      const int m0 = m_tile + 2 * t;
#pragma unroll
      for (int j = 0; j < TOKENS / 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = m0 + 8 * j + h;
          if (m >= M) continue;
          float v[2 * RS];
#pragma unroll
          for (int k = 0; k < RS; ++k) {
            v[2 * k] = poisoned ? qnan() : acc[k][j][h];
            v[2 * k + 1] = poisoned ? qnan() : acc[k][j][2 + h];
          }
#pragma unroll
          for (int r = 0; r < S::kRuns; ++r) {
            constexpr int kC = S::kRunCols;
            const int nr = column(kC * r);
            if (r > 0 && nr >= N) continue;
            if (to_y) {
              alignas(2 * kC) T o[kC];
#pragma unroll
              for (int c = 0; c < kC; ++c) o[c] = Cvt<T>::from_f(v[kC * r + c] + bv[kC * r + c]);
              T* dst = y + int64_t(m) * N + nr;
              if constexpr (kC == 2) {
                *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(o);
              } else {
                *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(o);
              }
            } else {
              float* dst = part + (part_base + int64_t(m) * part_ld + nr);
              if constexpr (kC == 2) {
                *reinterpret_cast<float2*>(dst) = make_float2(v[2 * r], v[2 * r + 1]);
              } else {
                *reinterpret_cast<float4*>(dst) =
                    make_float4(v[4 * r], v[4 * r + 1], v[4 * r + 2], v[4 * r + 3]);
              }
            }
          }
        }
      }
    };

    int gi = 0;  // blocks consumed so far, over all pieces: the ring position
    TilePiece pc;
    for (int u = sch.start<STREAM>(); sch.next_piece<STREAM>(u, pc);) {
#pragma unroll
      for (int a = 0; a < RS; ++a)
#pragma unroll
        for (int j = 0; j < TOKENS / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[a][j][e] = 0.f;
      cur_group = -1;  // a piece starts with its columns' scales
      poisoned = false;
      TableChunks table(blocks, pc.jb0, pc.nb, R, G);
      int i = 0;
      for (; i + 1 < pc.nb; i += 2, gi += 2) {
        step(table, i, gi, a0, a1);
        step(table, i + 1, gi + 1, a1, a0);
      }
      if (i < pc.nb) step(table, i, gi++, a0, a1);
      wgmma_wait<0>();
      // the piece's last slot is released here: the next piece's copies may need it
      if (pending >= 0) mbar_arrive(empty0 + 8 * pending);
      pending = -1;
      store(pc);
    }
  }
#else
  __trap();  // launched only on compute capability 9.0, where the sm_90a code runs
#endif
}

// Stream-K's second kernel: the tiles that CTA boundaries cut, each the sum of its pieces'
// partials in CTA order (+ bias), rounded once into y. CTA (b - 1, c) takes part c of the tile
// that boundary b cuts first (StreamK::cut_tile).
template <typename T, int TOKENS, int COLS>
__global__ void stream_fixup_kernel(const float* __restrict__ part, const void* __restrict__ bias,
                                    int bias_kind, T* __restrict__ y, int M, int N,
                                    StreamK sk) {
  wait_prior_grid();  // the partials
  allow_next_grid();
  int p0 = 0, p1 = 0;
  const int tile = sk.cut_tile(blockIdx.x + 1, p0, p1);
  if (tile < 0) return;
  const int m_tile = tile % sk.mtiles * TOKENS, n0 = tile / sk.mtiles * COLS;
  constexpr int kElems = TOKENS * COLS;
  for (int e = blockIdx.y * blockDim.x + threadIdx.x; e < kElems; e += gridDim.y * blockDim.x) {
    const int m = m_tile + e / COLS, n = n0 + e % COLS;
    if (m >= M || n >= N) continue;
    float v = 0.f;
    for (int p = p0; p <= p1; ++p) v += part[int64_t(sk.tile_slot(p, tile)) * kElems + e];
    if (bias_kind != kAuxNone) v += aux_load(bias, bias_kind, n);
    y[int64_t(m) * N + n] = Cvt<T>::from_f(v);
  }
}

template <typename T, int TOKENS, int RS>
void launch(const at::Tensor& xs, int64_t M, const at::Tensor& qweight, const at::Tensor& scales,
            const at::Tensor& zeros, const at::Tensor& blocks,
            const std::optional<at::Tensor>& bias, at::Tensor& y) {
  using S = TileShape<TOKENS, RS>;
  const int K = xs.size(1), N = qweight.size(1);
  const int nblocks = K / kBlockRows;
  const at::Tensor bias_t = bias.has_value() ? aux_tensor(*bias) : at::Tensor();
  const void* bias_p = bias_t.defined() ? bias_t.data_ptr() : nullptr;
  const int bias_kind = bias_t.defined() ? aux_kind(bias_t) : kAuxNone;
  static_assert(S::kCols == tile_columns(TOKENS), "plan.h prices this tile's columns");
  const int mtiles = int((M + TOKENS - 1) / TOKENS);
  const int ntiles = (N + S::kCols - 1) / S::kCols;
  const Grid grid = tile_grid(M, N, nblocks, TOKENS, sm_count(), knobs());
  const bool stream_k = grid.ctas > 0;
  // units < 2^31 where the plan chose stream-K (plan.cpp)
  const StreamK sk = stream_k ? StreamK::of(mtiles, ntiles, nblocks, grid.ctas)
                              : StreamK{mtiles, nblocks, 0, 0, 0};
  const Schedule sch{grid.blocks_per_split, sk.mtiles, sk.nblocks, sk.ctas, sk.q, sk.r};
  auto kernel = stream_k ? tile_gemm_kernel<T, TOKENS, RS, true>
                         : tile_gemm_kernel<T, TOKENS, RS, false>;
  static int ready[2][64] = {};
  allow_smem_once(ready[stream_k], kernel, S::kSmemBytes);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // fp32 partials: grid [splits, M, N] (several splits); stream-K two slots a CTA
  at::Tensor part;
  if (grid.ctas > 1) {
    part = at::empty({2 * grid.ctas, TOKENS, S::kCols}, xs.options().dtype(at::kFloat));
  } else if (grid.ctas == 0 && grid.splits > 1) {
    part = at::empty({grid.splits, M, N}, xs.options().dtype(at::kFloat));
  }
  const dim3 grid_dim = stream_k ? dim3(grid.ctas) : dim3(mtiles, ntiles, grid.splits);
  const bool y_bias = stream_k || grid.splits == 1;  // the kernel writes whole tiles
  T* y_p = reinterpret_cast<T*>(y.data_ptr());
  float* part_p = part.defined() ? part.data_ptr<float>() : nullptr;
  launch_chained(kernel, grid_dim, dim3(kThreads), S::kSmemBytes, stream,
                 reinterpret_cast<const T*>(xs.data_ptr()),
                 reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
                 reinterpret_cast<const uint16_t*>(scales.data_ptr()),
                 reinterpret_cast<const uint16_t*>(zeros.data_ptr()),
                 reinterpret_cast<const int32_t*>(blocks.data_ptr()),
                 y_bias ? bias_p : nullptr, y_bias ? bias_kind : kAuxNone, y_p, part_p, int(M),
                 K, N, int(qweight.size(0)), int(scales.size(0)), sch);
  if (grid.ctas > 1) {
    // one CTA row per boundary, each tile's elements in 8 parts of 256 threads
    launch_chained(stream_fixup_kernel<T, TOKENS, S::kCols>, dim3(grid.ctas - 1, 8), dim3(256),
                   0, stream, static_cast<const float*>(part_p), bias_p, bias_kind, y_p, int(M),
                   N, sk);
  } else if (part.defined()) {
    reduce_splits<T>(part, bias_p, bias_kind, y.data_ptr(), stream);
  }
}

template <typename T>
void launch_tokens(const at::Tensor& xs, int64_t M, int tokens, const at::Tensor& qweight,
                   const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& blocks,
                   const std::optional<at::Tensor>& bias, at::Tensor& y) {
  switch (tokens) {
    case 16: return launch<T, 16, 4>(xs, M, qweight, scales, zeros, blocks, bias, y);
    case 32: return launch<T, 32, 4>(xs, M, qweight, scales, zeros, blocks, bias, y);
    case 64: return launch<T, 64, 4>(xs, M, qweight, scales, zeros, blocks, bias, y);
    case 128: return launch<T, 128, 2>(xs, M, qweight, scales, zeros, blocks, bias, y);
    default: return launch<T, 256, 1>(xs, M, qweight, scales, zeros, blocks, bias, y);
  }
}

}  // namespace

void gemm_tile(const at::Tensor& xs, int64_t M, int tokens, const at::Tensor& qweight,
               const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& blocks,
               const std::optional<at::Tensor>& bias, at::Tensor& y) {
  TORCH_CHECK(M >= 1 && is_tile_tokens(tokens) &&
                  xs.size(0) == (M + tokens - 1) / tokens * tokens &&
                  xs.size(1) % kBlockRows == 0 && wgmma_available() &&
                  mma_supported(xs, qweight, scales, zeros),
              "mbwq: internal: tile GEMM called with unsupported arguments (M = ", M,
              ", tokens = ", tokens, ", xs rows = ", xs.size(0), ")");
  if (xs.scalar_type() == at::kHalf) {
    launch_tokens<__half>(xs, M, tokens, qweight, scales, zeros, blocks, bias, y);
  } else {
    launch_tokens<__nv_bfloat16>(xs, M, tokens, qweight, scales, zeros, blocks, bias, y);
  }
}

}  // namespace cuda
}  // namespace mbwq
