// Tensor-core GEMM for the fewest tokens (decode, M <= kDirectMaxM): the weights go from global
// memory straight into registers, with no shared-memory ring, so that a warp's instructions
// go to the decode rather than to ring bookkeeping (the M = 1 kernel is issue-bound, not
// DRAM-bound). y^T [N, M] = W^T [N, K] . xs^T [K, M] with mma.sync.m16n8k16,
// one token tile of 8 up to M = 8, two up to 16 (tokens past M repeat token M - 1 and are never
// stored).
//
// Lanes, codes and decode are those of gemm_mma.cu (mma_decode.cuh): lane (g, t) owns the
// 4 * kQN columns 32q + 4g + e and, in each 32-row block, the stored rows 8t .. 8t + 7, which
// lie in the block's words j0 = (t * B) / 4 and j0 + 1 (odd widths and 8; widths 2 and 4 need
// j0 only). A lane reads them as one 16-byte load per quad and word row:
//
//   qweight row (word j0 of a block), one warp, quad q:
//     | g=0: cols 32q+0..3 | g=1: 32q+4..7 | ... | g=7: 32q+28..31 |   128 contiguous bytes
//   lanes t = 0..3 read rows j0(t): for 4 bits rows 0, 1, 2, 3 of the block, so one warp load
//   is 4 full 128-byte lines per quad.
//
// Pipeline: each warp walks its contiguous range of blocks with the next DEPTH blocks' words
// and x fragments in registers: a rotating set of DEPTH register sets, the loop unrolled by the
// depth so that every set has registers of its own, each refilled right after its block is
// computed. One set holds the words of any width (j0 and, where needed, j0 + 1), so a mixed
// layer's width changes cost a branch around the decode, not a drain of the pipeline. (Runs
// of one width with a set sized per width made ptxas keep a register set for every width: 255
// registers and spills.) The scales and zeros of a block that starts a group are prefetched
// into L1 when its words are requested and read when it is computed.
//
// CTA = 8 warps = WC column warps x WK k-warps, K splits over CTAs: the shapes, the block table
// in shared memory, the k-warp reduction and the split partials are those of gemm_mma.cu
// (mma_tile.cuh, split_reduce.cuh), chosen by the same cost model (choose_grid).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../format.h"
#include "common.cuh"
#include "launch.h"
#include "mma_decode.cuh"
#include "mma_tile.cuh"

namespace mbwq {
namespace cuda {
namespace {

constexpr int kQN = 2;                 // column quads per lane: a warp spans 64 columns
constexpr int kWarpCols = 32 * kQN;

// A lane's 16 bytes of a qweight row. Every weight byte is read once per call (column tiles and
// K ranges are disjoint), so the line is not kept in L1, where it would only push out the
// scales and zeros prefetched there.
__device__ __forceinline__ uint4 load_words(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 load8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
// An empty asm that "changes" v: ptxas must keep the value in a register from here on instead
// of recomputing it from the thread index where it is used (which it did in every block's
// requests: ~35 of 223 instructions a block at four blocks in flight).
template <typename P>
__device__ __forceinline__ void pin(P*& p) { asm volatile("" : "+l"(p)); }
__device__ __forceinline__ void pin(int& v) { asm volatile("" : "+r"(v)); }
// When `start`: the L1 lines of row `group` of scales and of zeros at the lane's first column,
// sc + group * row_bytes and zr + group * row_bytes (the lane's second quad, 64 bytes on, lies
// in the same 128-byte line when N is a multiple of 64, as in every model layer, and the
// tensors start on 128 bytes, as torch allocates them). One PTX block for the addresses and
// both prefetches: 7 instructions a block, where the C++ form with one prefetch per quad took
// ~15; ptxas predicates some of its copies in the unrolled loop and branches around others.
// The branch is a plain `bra` (not `.uni`), so it stays defined should a caller ever pass a
// `start` that differs between lanes.
__device__ __forceinline__ void prefetch_group_l1(bool start, const void* sc, const void* zr,
                                                  int group, uint32_t row_bytes) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      ".reg .u64 a, b;\n"
      "setp.ne.u32 p, %0, 0;\n"
      "@!p bra SKIP;\n"
      "mad.wide.u32 a, %1, %2, %3;\n"
      "mad.wide.u32 b, %1, %2, %4;\n"
      "prefetch.global.L1 [a];\n"
      "prefetch.global.L1 [b];\n"
      "SKIP:\n"
      "}\n" ::"r"(uint32_t(start)),
      "r"(uint32_t(group)), "r"(row_bytes), "l"(sc), "l"(zr));
}

// One block's registers for a lane: its word rows j0 (lo) and j0 + 1 (hi; odd widths and 8)
// per quad, and its x fragment per token tile (token 8 mt + g, k 8t .. 8t + 7). The same registers
// serve every width, so that a mixed layer's width changes cost a branch, not a pipeline drain
// (and ptxas one register set, not one per width).
template <int MT>
struct Fetched {
  uint4 lo[kQN], hi[kQN];
  uint4 x[MT];
};

// What a lane reads, fixed for the kernel. Quads past N (only in the last column tile) and
// tokens past M read in-bounds stand-ins instead of being predicated off: the column N - 4 and
// the token M - 1. Their products land only in accumulators that are never stored (a quad's
// columns, a token's B column), so the loop needs no predicates and no zero fills.
struct LaneSource {
  const unsigned char* q;   // qweight row 0 at the lane's first column
  const uint16_t* sc;       // scales row 0 at the lane's first column
  const uint16_t* zr;       // zeros likewise
  const unsigned char* x;   // xs row of token min(g, M - 1), k of the warp's first block + 8t
  int x_tile_step;          // bytes from that row to the one of token min(8 + g, M - 1)
  int quad_step;            // columns from the lane's first quad to its second (32, or less
                            // where clamped)
};

// Block (bits, word)'s words for the lane. An invalid entry (bits == 0, word 0) reads row 0,
// and is never computed.
template <int MT>
__device__ __forceinline__ void fetch_words(Fetched<MT>& f, const LaneSource& s, int bits, int word,
                                            int t, uint32_t row_bytes) {
  static_assert(kQN == 2, "LaneSource has one quad step");
  const int j0 = (t * bits) >> 2;
  const unsigned char* lo_row = s.q + size_t(uint32_t(word + j0)) * row_bytes;
  f.lo[0] = load_words(lo_row);
  f.lo[1] = load_words(lo_row + 4 * s.quad_step);
  if (bits != 0 && reads_next_word(bits)) {  // uniform over the warp
    // the next word row; the last row of a block is never needed as hi, so clamp inside
    const unsigned char* hi_row = lo_row + (j0 + 1 < bits ? row_bytes : 0);
    f.hi[0] = load_words(hi_row);
    f.hi[1] = load_words(hi_row + 4 * s.quad_step);
  }
}

// The x fragments (one per token tile) of block number `block` of the warp's range.
template <int MT>
__device__ __forceinline__ void fetch_x(Fetched<MT>& f, const LaneSource& s, int block) {
  static_assert(MT <= 2, "LaneSource has one token-tile step");
  const unsigned char* p = s.x + size_t(block) * (kBlockRows * 2);  // 2-byte x (fp16, bf16)
  f.x[0] = load16_l2(p);  // written by the gather kernel, which may still run at our start
  if constexpr (MT == 2) f.x[1] = load16_l2(p + s.x_tile_step);
}

// One block: decode each quad's words into A fragments (mma_decode.cuh) and multiply with the
// x fragments, as gemm_mma.cu's compute_quad does.
template <int B, int MT, typename T>
__device__ __forceinline__ void compute_block(const Fetched<MT>& f, int t, const uint2 (&sc)[kQN],
                                              const uint2 (&nz)[kQN],
                                              float (&acc)[2 * kQN][MT][4]) {
#pragma unroll
  for (int q = 0; q < kQN; ++q) {
    uint32_t a[2][8];
    decode_quad<B, kQN, T>(q, f.lo[q], f.hi[q], t, sc, nz, a);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        MmaOp<T>::run(acc[2 * q + k][mt], a[k][0], a[k][1], a[k][2], a[k][3], f.x[mt].x,
                      f.x[mt].y);
        MmaOp<T>::run(acc[2 * q + k][mt], a[k][4], a[k][5], a[k][6], a[k][7], f.x[mt].z,
                      f.x[mt].w);
      }
  }
}

// grid: (column tiles, splits); block: kWarps * 32 threads. xs: x gathered in XOrder::kMma
// [M, K]. out: splits == 1 -> y [M, N] (T) with bias; else fp32 partials [splits, M, N].
// DEPTH: blocks in flight per warp (register sets of the pipeline); MIN_CTAS: CTAs per SM that
// the registers are sized for.
template <typename T, int MT, int DEPTH, int MIN_CTAS>
__global__ void __launch_bounds__(kWarps * 32, MIN_CTAS)
    direct_gemm_kernel(const T* __restrict__ xs, const uint32_t* __restrict__ qweight,
                       const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
                       const int32_t* __restrict__ blocks, const void* __restrict__ bias,
                       int bias_kind, void* __restrict__ out, int M, int K, int N, int R, int G,
                       int log2_wc, int blocks_per_split) {
  static_assert(sizeof(T) == 2, "fetch_x steps over 2-byte x");
  extern __shared__ __align__(16) unsigned char smem[];
  allow_next_grid();  // the split reduction, if any, may be scheduled
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4;
  int t = lane % 4;
  // Pinned up to three blocks in flight; at four the registers are short and pinning spills.
  constexpr bool kPin = DEPTH <= 3;
  if constexpr (kPin) pin(t);
  const WarpPlace place(warp, log2_wc);
  const int n_warp = ((blockIdx.x << log2_wc) + place.wc) * kWarpCols;
  const WarpRange r(K, blocks_per_split, place.kw, kLog2Warps - log2_wc);
  const int nb = r.nb;
  int2* meta = reinterpret_cast<int2*>(smem);
  stage_table(meta, blocks, r, R, G);
  int meta_off = r.wb - r.jb0;
  if constexpr (kPin) pin(meta_off);
  const int2* my_meta = meta + meta_off;
  const uint32_t row_bytes = uint32_t(N) * 4;

  LaneSource src;
  const int c0 = min(n_warp + 4 * g, N - 4), c1 = min(n_warp + 4 * g + 32, N - 4);
  src.q = reinterpret_cast<const unsigned char*>(qweight + c0);
  src.sc = scales + c0;
  src.zr = zeros + c0;
  src.quad_step = c1 - c0;
  src.x = reinterpret_cast<const unsigned char*>(xs + size_t(min(g, M - 1)) * K +
                                                 size_t(r.wb) * kBlockRows + 8 * t);
  src.x_tile_step = (min(8 + g, M - 1) - min(g, M - 1)) * K * int(sizeof(T));
  if constexpr (kPin) {
    pin(src.q);
    pin(src.sc);
    pin(src.zr);
    pin(src.x);
    pin(src.quad_step);
  }

  float acc[2 * kQN][MT][4];
  fill_acc<MT, kQN>(acc, 0.f);
  uint2 sc[kQN], nz[kQN];  // the lane's scales and -zeros (fp16) of the current group
  int cur_group = -1, issue_group = -1;

  // The lane's 4 columns of quad q in row `group` of scales or zeros (base: src.sc / src.zr).
  auto group_cols = [&](const uint16_t* base, int group, int q) {
    return base + size_t(group) * N + q * src.quad_step;
  };
  // Block i's words into register set f, and its scales and zeros into L1 when it starts a
  // group.
  auto request_words = [&](Fetched<MT>& f, int i) {
    const int2 e = my_meta[i];
    const int bits = e.x & 15, group = e.x >> 4;
    fetch_words(f, src, bits, e.y, t, row_bytes);
    prefetch_group_l1(starts_group(bits, group, issue_group), src.sc, src.zr, group,
                      row_bytes / 2);
  };
  Fetched<MT> f[DEPTH];
#pragma unroll
  for (int s = 0; s < DEPTH; ++s)
    if (s < nb) request_words(f[s], s);
  // x is written by the gather kernel before this one (pdl.cuh): the first blocks' weights
  // above may already be on their way while it runs.
  wait_prior_grid();
#pragma unroll
  for (int s = 0; s < DEPTH; ++s)
    if (s < nb) fetch_x(f[s], src, s);
#pragma unroll 1
  for (int i = 0; i < nb; i += DEPTH) {
#pragma unroll
    for (int s = 0; s < DEPTH; ++s) {
      const int b = i + s;
      if (b < nb) {
        const int2 e = my_meta[b];
        const int bits = e.x & 15, group = e.x >> 4;
        if (starts_group(bits, group, cur_group)) {
#pragma unroll
          for (int q = 0; q < kQN; ++q) {
            sc[q] = load8(group_cols(src.sc, group, q));
            nz[q] = negate_halves(load8(group_cols(src.zr, group, q)));
          }
        }
        with_width(bits, [&](auto width) {
          constexpr int B = decltype(width)::value;
          if constexpr (B > 0) compute_block<B, MT, T>(f[s], t, sc, nz, acc);
        });
        if (b + DEPTH < nb) {
          request_words(f[s], b + DEPTH);
          fetch_x(f[s], src, b + DEPTH);
        }
      }
    }
  }
  // An invalid table entry in the warp's range makes its tile NaN.
  bool poisoned = false;
  for (int k = lane; k < nb; k += 32) poisoned |= (my_meta[k].x & 15) == 0;
  poisoned = __any_sync(~0u, poisoned);
  finish_tile<T, MT, kQN>(acc, poisoned, smem, log2_wc, bias, bias_kind, out, M, N);
}

template <typename T, int MT, int DEPTH, int MIN_CTAS>
void run_kernel(const Call<T>& c) {
  const int M = c.xs.size(0), K = c.xs.size(1), N = c.qweight.size(1);
  auto kernel = direct_gemm_kernel<T, MT, DEPTH, MIN_CTAS>;
  const size_t table = kMaxBlocksPerCta * sizeof(int2);
  const size_t red = size_t(kWarps - 1) * 2 * kQN * MT * 4 * 32 * sizeof(float);  // finish_tile
  const size_t smem = std::max(table, red);
  static int ctas_per_sm[64] = {};
  const int slots = resident_ctas(ctas_per_sm, kernel, smem);
  const GridChoice gc = choose_grid(K / kBlockRows, N, kWarpCols, M,
                                    double(c.qweight.numel()) * 4, slots, DEPTH, {1, 2, 4}, true);
  launch_on_grid(kernel, gc, smem, c);
}

}  // namespace

// One token tile (M <= 8) with three blocks in flight per warp (MBWQ_DIRECT_VARIANT=1: four,
// unpinned, for the A/B); two tiles (9-16 tokens) with two, where three spill (ptxas: 52-64
// bytes).
template <typename T>
void launch_direct(const Call<T>& c) {
  TORCH_CHECK(c.xs.size(0) >= 1 && c.xs.size(0) <= kDirectMaxM,
              "mbwq: internal: direct path needs 1 <= M <= ", kDirectMaxM, ", got M = ",
              c.xs.size(0));
  if (c.xs.size(0) > 8) return run_kernel<T, 2, 2, 2>(c);
  if (tuning_override("MBWQ_DIRECT_VARIANT") == 1) return run_kernel<T, 1, 4, 2>(c);
  run_kernel<T, 1, 3, 2>(c);
}
template void launch_direct<__half>(const Call<__half>& c);
template void launch_direct<__nv_bfloat16>(const Call<__nv_bfloat16>& c);

}  // namespace cuda
}  // namespace mbwq
