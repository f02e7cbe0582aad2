// Tensor-core GEMM for small and medium M (fp16 / bf16 activations), reading the stored
// qweight directly: y^T [N, M] = W^T [N, K] . xs^T [K, M] with mma.sync.m16n8k16.
//
// Roles: W^T is the A operand (16 output columns x 16 k), xs^T the B operand (16 k x 8 tokens),
// fp32 accumulators. Every packed weight byte is read from DRAM once per call, whatever M.
//
// ---------------------------------------------------------------------------------------
// Work split (both kernels).  CTA = 8 warps = WC column warps x WK = 8 / WC k-warps.
//
//   columns n ->    warp tile = 32*QN columns (QN = 1 or 2 quads of 4 columns per lane)
//        +-----------+-----------+
//   k    | wc=0 kw=0 | wc=1 kw=0 |     grid.x = column tiles of WC warp tiles
//   |    +-----------+-----------+     grid.y = K splits (fp32 partials + reduce kernel)
//   v    | wc=0 kw=1 | wc=1 kw=1 |     k-warps of a CTA take contiguous ranges of 32-row
//        +-----------+-----------+     blocks and add up through shared memory in order.
//
// Two ways to bring a warp's blocks in:
//   - streaming kernel (M <= 8): 16-byte loads straight into registers, 2-4 blocks ahead,
//     one loop per run of equal-width blocks (no per-block width switch); ~2.5 instructions
//     per 4-bit code. x is gathered in the kernel for one-wave grids.
//   - ring kernel (8 < M <= 32): a per-warp ring of cp.async slots in shared memory, with the
//     scales copied only at group starts; x fragments of 2-4 token tiles per block.
// Measured (BENCHMARKS.md) neither reaches DRAM bandwidth on large layers at M = 1: both stay
// near 60 %, with or without the decode (loads only), so the limit is the memory pipeline's
// latency, not instructions.
//
// Ring slot (ring kernel):
//   slot: | row 0 (4*32*QN bytes) pad | row 1 pad | ... | row 7 pad | scales | zeros |
//           rows padded to 32 mod 128 bytes so that the LDS.128 are conflict-free
//
// Activations come from the gathered, interleaved xs (gather_x_kernel, or the CTA's own gather
// into shared memory): the column warps of a CTA and CTAs on the same SM read the same lines.
//
// ---------------------------------------------------------------------------------------
// The decode (which codes a lane takes, how they become fp16) is described in mma_decode.cuh.
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
#include "mma_decode.cuh"
#include "mma_tile.cuh"

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

// One 32-row block of width B from ring slot `slot`.
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
    compute_quad<B, QN, MT, T>(q, lo, hi, t, sc, nz, xb, acc);
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


// ---- streaming kernel: weights straight from DRAM into registers -----------------------------
//
// Each warp walks its blocks as runs of equal width (a mixed layer's groups are sorted by
// width, a uniform layer is one run) and, inside a run, keeps D = kStreamDepth<B> blocks in
// flight in registers: block i + D is loaded right after block i is computed. Every load is a
// 16-byte LDG of 4 columns x one qweight row; the 8 lanes g of one t read 128 contiguous bytes.
//
//   lane (g, t), quad q:  lo = qweight[word + j0][col_q .. col_q + 3],  j0 = (t * B) / 4
//                         hi = the row below (widths 3, 5, 6, 8: the lane's bytes may straddle)
//
// Columns past N are clamped to N - 4 and tokens past M to M - 1, so no load needs a predicate;
// their results land in accumulators that are never stored.
// Scales and zeros are prefetched into L2 when the group's first block is issued and loaded
// into registers when it is computed.

// Blocks in flight per warp by width: two (four for the half-size 2-bit blocks), within 128
// registers a thread. Measured on the H100 (8192 x 28672, 4-bit, loads only): four 4-bit
// blocks in flight were no faster than two, and an L2 prefetch 2-8 blocks further ahead gave
// nothing either.
template <int B>
constexpr int kStreamDepth = B == 2 ? 4 : 2;

template <int B, int QN>
struct StreamStage {
  static constexpr bool kHi = !(B == 2 || B == 4);
  uint4 lo[QN];
  uint4 hi[kHi ? QN : 1];
};

// Per-lane state of the streaming kernel.
template <int QN, int MT>
struct StreamLane {
  int col[QN];   // first column of each quad, clamped into [0, N - 4]
  const void* x;   // the lane's 8 x elements of block 0, token row 0 (global or shared)
  int xrow[MT];    // token row of tile mt: 8 mt + g, clamped to M - 1
  int xstride, t;  // elements from one token row of x to the next
  int cur_group = -1, issue_group = -1;  // starts_group state of the compute / issue sides
  uint2 sc[QN], nz[QN];
};

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// x fragments of block b for the MT token tiles.
template <typename T, int QN, int MT>
__device__ __forceinline__ void load_x_block(const StreamLane<QN, MT>& ln, int b,
                                             uint4 (&xb)[MT]) {
  const T* p = static_cast<const T*>(ln.x) + b * kBlockRows;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    xb[mt] = *reinterpret_cast<const uint4*>(p + int64_t(ln.xrow[mt]) * ln.xstride);
}

// Start the loads of the block with table entry e (width B) into stage st.
template <int B, int QN, int MT>
__device__ __forceinline__ void stream_issue(StreamStage<B, QN>& st, int2 e,
                                             const uint32_t* __restrict__ qweight,
                                             const uint16_t* __restrict__ scales,
                                             const uint16_t* __restrict__ zeros, int N,
                                             StreamLane<QN, MT>& ln) {
  const int j0 = (ln.t * B) >> 2;
  const uint32_t* row = qweight + size_t(e.y + j0) * N;
#pragma unroll
  for (int q = 0; q < QN; ++q) st.lo[q] = __ldg(reinterpret_cast<const uint4*>(row + ln.col[q]));
  if constexpr (StreamStage<B, QN>::kHi) {
    // the next row, or the same one when j0 is the block's last row (then unused)
    const int hi_step = j0 + 1 < B ? N : 0;
#pragma unroll
    for (int q = 0; q < QN; ++q)
      st.hi[q] = __ldg(reinterpret_cast<const uint4*>(row + hi_step + ln.col[q]));
  }
  const int group = e.x >> 4;
  if (starts_group(B, group, ln.issue_group)) {
#pragma unroll
    for (int q = 0; q < QN; ++q) {
      prefetch_l2(scales + size_t(group) * N + ln.col[q]);
      prefetch_l2(zeros + size_t(group) * N + ln.col[q]);
    }
  }
}

// One run [r0, r1) of blocks of width B. The loads past the run's end re-read its last block
// (clamped index) instead of being predicated: conditional writes of the stage registers made
// ptxas spill.
template <int B, typename T, int QN, int MT>
__device__ __forceinline__ void stream_run(int r0, int r1, const int2* __restrict__ meta,
                                           const uint32_t* __restrict__ qweight,
                                           const uint16_t* __restrict__ scales,
                                           const uint16_t* __restrict__ zeros, int N,
                                           StreamLane<QN, MT>& ln, float (&acc)[2 * QN][MT][4]) {
  using Stage = StreamStage<B, QN>;
  constexpr int D = kStreamDepth<B>;
  Stage st[D];
#pragma unroll
  for (int s = 0; s < D; ++s)
    stream_issue<B>(st[s], meta[min(r0 + s, r1 - 1)], qweight, scales, zeros, N, ln);
  uint4 xn[MT];  // x of the next block, one block ahead (L1 / L2 hits)
  load_x_block<T>(ln, r0, xn);
  for (int i = r0; i < r1; i += D) {
#pragma unroll
    for (int s = 0; s < D; ++s) {
      const int b = i + s;
      if (b < r1) {
        uint4 xb[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) xb[mt] = xn[mt];
        if (b + 1 < r1) load_x_block<T>(ln, b + 1, xn);
        if (starts_group(B, meta[b].x >> 4, ln.cur_group))
          load_scales<QN>(scales, zeros, ln.cur_group, N, ln.col, ln.sc, ln.nz);
#pragma unroll
        for (int q = 0; q < QN; ++q)
          compute_quad<B, QN, MT, T>(q, st[s].lo[q], Stage::kHi ? st[s].hi[q] : st[s].lo[q], ln.t,
                                     ln.sc, ln.nz, xb, acc);
        stream_issue<B>(st[s], meta[min(b + D, r1 - 1)], qweight, scales, zeros, N, ln);
      }
    }
  }
}

// grid: (column tiles, splits); block: kWarps * 32 threads.
// xa: raw x, perm and channel_scale when fused_x (gathered here), else xa.x is the gathered,
// scaled, interleaved xs [M, K] (gather_x_kernel).
// out: splits == 1 -> y [M, N] (T) with bias; else fp32 partials [splits, M, N].
template <typename T, int MT, int QN, int MIN_CTAS>
__global__ void __launch_bounds__(kWarps * 32, MIN_CTAS)
    mma_stream_kernel(XArgs<T> xa, int fused_x, const uint32_t* __restrict__ qweight,
                      const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
                      const int32_t* __restrict__ blocks, const void* __restrict__ bias,
                      int bias_kind, void* __restrict__ out, int M, int K, int N, int R, int G,
                      int WC, int blocks_per_split) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wc = warp % WC, kw = warp / WC, WK = kWarps / WC;
  const int n_warp = (blockIdx.x * WC + wc) * 32 * QN;
  const WarpRange r(K, blocks_per_split, kw, WK);
  int2* meta = reinterpret_cast<int2*>(smem);
  StreamLane<QN, MT> ln;
  ln.t = t;
  if (fused_x) {
    // x of the CTA's K range, gathered here into shared memory (rows [M, len * 32]); saves
    // the gather kernel's launch, which dominates small layers at M = 1.
    T* xsm = reinterpret_cast<T*>(smem + kMaxBlocksPerCta * sizeof(int2));
    const int chunks = r.len * (kBlockRows / 8);
    for (int i = threadIdx.x; i < M * chunks; i += blockDim.x) {
      const int m = i / chunks, c = i % chunks;
      *reinterpret_cast<uint4*>(xsm + m * chunks * 8 + c * 8) =
          gather_chunk(xa, K, m, r.jb0 * (kBlockRows / 8) + c);
    }
    ln.x = xsm + (r.wb - r.jb0) * kBlockRows + 8 * t;
    ln.xstride = chunks * 8;
  } else {
    ln.x = xa.x + int64_t(r.wb) * kBlockRows + 8 * t;
    ln.xstride = K;
  }
  stage_table(meta, blocks, r, R, G);  // its barrier also covers the x gather
  const int2* my_meta = meta + (r.wb - r.jb0);

#pragma unroll
  for (int q = 0; q < QN; ++q) ln.col[q] = min(n_warp + 32 * q + 4 * g, N - 4);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) ln.xrow[mt] = min(8 * mt + g, M - 1);

  float acc[2 * QN][MT][4];
  fill_acc<MT, QN>(acc, 0.f);

  bool poisoned = false;
  for (int i = 0; i < r.nb;) {
    // the run of blocks of i's width: its end is the first differing entry, 32 at a time
    const int bits = my_meta[i].x & 15;
    int j = i + 1;
    for (;;) {
      const int k = j + lane;
      const unsigned m = __ballot_sync(~0u, k >= r.nb || (my_meta[k].x & 15) != bits);
      if (m) {
        j += __ffs(m) - 1;
        break;
      }
      j += 32;
    }
    switch (bits) {
      case 2: stream_run<2, T, QN, MT>(i, j, my_meta, qweight, scales, zeros, N, ln, acc); break;
      case 3: stream_run<3, T, QN, MT>(i, j, my_meta, qweight, scales, zeros, N, ln, acc); break;
      case 4: stream_run<4, T, QN, MT>(i, j, my_meta, qweight, scales, zeros, N, ln, acc); break;
      case 5: stream_run<5, T, QN, MT>(i, j, my_meta, qweight, scales, zeros, N, ln, acc); break;
      case 6: stream_run<6, T, QN, MT>(i, j, my_meta, qweight, scales, zeros, N, ln, acc); break;
      case 8: stream_run<8, T, QN, MT>(i, j, my_meta, qweight, scales, zeros, N, ln, acc); break;
      default: poisoned = true; ln.cur_group = ln.issue_group = -1;
    }
    i = j;
  }
  finish_tile<T, MT, QN>(acc, poisoned, smem, wc, kw, WC, WK, n_warp, bias, bias_kind, out, M, N);
}

// ---- ring kernel: weights through a per-warp cp.async ring in shared memory ------------------

// grid: (column tiles, splits); block: kWarps * 32 threads. Same parameters as the streaming
// kernel (one launcher), but x always comes gathered: xa.x is xs [M, K]; fused_x is unused.
// out: splits == 1 -> y [M, N] (T) with bias; else fp32 partials [splits, M, N].
template <typename T, int MT, int QN, int STAGES, int MIN_CTAS>
__global__ void __launch_bounds__(kWarps * 32, MIN_CTAS)
    mma_gemm_kernel(XArgs<T> xa, int, const uint32_t* __restrict__ qweight,
                    const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
                    const int32_t* __restrict__ blocks, const void* __restrict__ bias,
                    int bias_kind, void* __restrict__ out, int M, int K, int N, int R, int G,
                    int WC, int blocks_per_split) {
  const T* xs = xa.x;  // gathered by gather_x_kernel
  using Rg = Slot<QN>;
  constexpr int kStages = STAGES;
  constexpr int kWarpBytes = STAGES * Rg::kSlotBytes;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wc = warp % WC, kw = warp / WC, WK = kWarps / WC;
  const int n_warp = (blockIdx.x * WC + wc) * Rg::kCols;
  const WarpRange r(K, blocks_per_split, kw, WK);
  const int wb = r.wb, nb = r.nb;
  int2* meta = reinterpret_cast<int2*>(smem + kWarps * kWarpBytes);
  stage_table(meta, blocks, r, R, G);
  const int2* my_meta = meta + (wb - r.jb0);
  unsigned char* ring = smem + warp * kWarpBytes;
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));

  float acc[2 * QN][MT][4];
  fill_acc<MT, QN>(acc, 0.f);

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
        nz[q] = negate_halves(z2);
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
  finish_tile<T, MT, QN>(acc, poisoned, smem, wc, kw, WC, WK, n_warp, bias, bias_kind, out, M, N);
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
__global__ void gather_x_kernel(XArgs<T> a, T* __restrict__ xs, int M, int K) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // one 8-row chunk
  const int chunks = K / 8;
  if (i >= int64_t(M) * chunks) return;
  const int m = int(i / chunks), c = int(i % chunks);
  *reinterpret_cast<uint4*>(xs + int64_t(m) * K + c * 8) = gather_chunk(a, K, m, c);
}

// Tuning hook for benchmarks: a positive integer from the environment (read at each call, so
// a sweep can change it in-process), else 0. Results do not depend on it beyond rounding order.
int tuning_override(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::max(0, std::atoi(v)) : 0;
}


// Kernel configurations: MT token tiles, QN quads per lane, STAGES ring slots per warp and the
// CTAs per SM the registers are sized for. Shared memory per CTA: 8 warps x STAGES slots + table
//   MT = 1: QN 2, 3 stages, 3 CTAs/SM (8 x 3 x 2560 + 8 KB = 68 KB; <= 80 registers)
//   MT = 2: QN 2, 4 stages, 2 CTAs/SM (88 KB)
//   MT = 4: QN 1, 4 stages, 2 CTAs/SM (52 KB; 4 token tiles need the registers)
// What one call needs besides the kernel configuration.
template <typename T>
struct Call {
  XArgs<T> xa;  // raw x, perm, channel_scale
  const at::Tensor& x;
  const at::Tensor &qweight, &scales, &zeros, &blocks;
  const void* bias;
  int bias_kind;
  void* out;
  cudaStream_t stream;
};

// One launch of a kernel configuration: MT token tiles, QN quads per lane, STAGES ring slots per
// warp (ring kernel; the streaming kernel's ramp is about as long) and the CTAs per SM its
// registers are sized for.
template <typename T, int MT, int QN, int STAGES, int MIN_CTAS, bool STREAM>
void run_kernel(const Call<T>& c, int WC) {
  const int M = c.x.size(0), K = c.x.size(1), N = c.qweight.size(1);
  const int R = c.qweight.size(0), G = c.scales.size(0);
  const int nblocks = K / kBlockRows;
  auto kernel = [] {
    if constexpr (STREAM) return mma_stream_kernel<T, MT, QN, MIN_CTAS>;
    else return mma_gemm_kernel<T, MT, QN, STAGES, MIN_CTAS>;
  }();
  const size_t table = kMaxBlocksPerCta * sizeof(int2);
  const size_t body = STREAM ? kFusedXBytes : size_t(kWarps) * STAGES * Slot<QN>::kSlotBytes;
  const size_t red = size_t(kWarps) * 2 * QN * MT * 4 * 32 * sizeof(float);
  const size_t smem_max = std::max(table + body, red);
  // Raise the shared-memory limit and read the occupancy once per device.
  static int ctas_per_sm[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  dev = std::min(dev, 63);
  if (ctas_per_sm[dev] == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(smem_max)));
    int n = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kWarps * 32, smem_max));
    ctas_per_sm[dev] = std::max(n, 1);
  }
  const int tiles = (N + WC * Slot<QN>::kCols - 1) / (WC * Slot<QN>::kCols);
  const int WK = kWarps / WC;
  const int slots = sm_count() * ctas_per_sm[dev];
  // K splits: model the time as waves x (blocks per warp + a pipeline ramp of ~STAGES
  // blocks), plus the fp32 partials' traffic, and take the cheapest.
  const double weight_bytes = double(c.qweight.numel()) * 4;
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

  // x in stored row order: gathered by each CTA into shared memory when the grid is one wave
  // and the CTA's K range is short (small layers, where the gather kernel's launch costs more
  // than the weights take to stream: H100 4096 x 4096, M = 1: 12.9 -> 11.9 us); else by
  // gather_x_kernel, once for all CTAs (8192 x 28672: 70 us fused -> 79 us; 28672 x 8192, one
  // wave of 448-block ranges: 66 -> 78 us).
  const size_t x_bytes = size_t(M) * bps * kBlockRows * sizeof(T);
  const bool fused_x = STREAM && x_bytes <= kFusedXBytes && bps <= kFusedXMaxBlocks &&
                       int64_t(tiles) * splits <= slots;
  XArgs<T> xa = c.xa;
  at::Tensor xs;
  if (!fused_x) {
    xs = at::empty({M, K}, c.x.options());
    const int64_t n = int64_t(M) * (K / 8);
    gather_x_kernel<T><<<(n + 255) / 256, 256, 0, c.stream>>>(
        c.xa, reinterpret_cast<T*>(xs.data_ptr()), M, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    xa = XArgs<T>{reinterpret_cast<const T*>(xs.data_ptr()), nullptr, nullptr, kAuxNone};
  }
  const size_t smem = std::max(table + (STREAM ? (fused_x ? x_bytes : 0) : body), red);

  at::Tensor part;
  void* dst = c.out;
  if (splits > 1) {
    part = at::empty({splits, M, N}, c.x.options().dtype(at::kFloat));
    dst = part.data_ptr();
  }
  kernel<<<dim3(tiles, splits), kWarps * 32, smem, c.stream>>>(
      xa, int(fused_x), reinterpret_cast<const uint32_t*>(c.qweight.data_ptr()),
      reinterpret_cast<const uint16_t*>(c.scales.data_ptr()),
      reinterpret_cast<const uint16_t*>(c.zeros.data_ptr()),
      reinterpret_cast<const int32_t*>(c.blocks.data_ptr()), part.defined() ? nullptr : c.bias,
      c.bias_kind, dst, M, K, N, R, G, WC, bps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (part.defined()) {
    const int64_t MN = int64_t(M) * N;
    reduce_splits_kernel<T><<<(MN + 255) / 256, 256, 0, c.stream>>>(
        part.data_ptr<float>(), c.bias, c.bias_kind, reinterpret_cast<T*>(c.out), splits, MN, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
            const at::Tensor& zeros, const at::Tensor& blocks, const at::Tensor& perm,
            const std::optional<at::Tensor>& channel_scale, const std::optional<at::Tensor>& bias,
            at::Tensor& y) {
  const int M = x.size(0);
  const at::Tensor cs_t = channel_scale.has_value() ? aux_tensor(*channel_scale) : at::Tensor();
  const at::Tensor bias_t = bias.has_value() ? aux_tensor(*bias) : at::Tensor();
  const Call<T> c{
      XArgs<T>{reinterpret_cast<const T*>(x.data_ptr()),
               perm.numel() ? perm.data_ptr<int32_t>() : nullptr,
               cs_t.defined() ? cs_t.data_ptr() : nullptr,
               cs_t.defined() ? aux_kind(cs_t) : kAuxNone},
      x, qweight, scales, zeros, blocks,
      bias_t.defined() ? bias_t.data_ptr() : nullptr,
      bias_t.defined() ? aux_kind(bias_t) : kAuxNone,
      y.data_ptr(), c10::cuda::getCurrentCUDAStream()};
  const int wc = tuning_override("MBWQ_MMA_WC");
  auto pick = [&](int dflt) { return (wc == 1 || wc == 2 || wc == 4 || wc == 8) ? wc : dflt; };
  // One token tile (M <= 8): the streaming kernel, two quads per lane, k-warps only.
  // More tiles: the ring kernel, whose x fragments of more tokens are shared by column warps
  // (the streaming kernel measured 3-40 % slower there, with spills at 128 registers).
  if (M <= 8) {
    run_kernel<T, 1, 2, 3, 2, true>(c, pick(1));
  } else if (M <= 16) {
    run_kernel<T, 2, 2, 4, 2, false>(c, pick(2));
  } else {
    run_kernel<T, 4, 1, 4, 2, false>(c, pick(4));
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
