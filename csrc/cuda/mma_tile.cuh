// Pieces of the mma.sync GEMM (gemm_mma.cu) around the decode: the warp's range of blocks,
// the block table in shared memory, group changes, the deterministic reduction of the k-warps'
// sums at the end, and the host side of a launch (the grid, the K split partials and their
// reduction).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <stdint.h>

#include <type_traits>

#include "../format.h"
#include "common.cuh"
#include "launch.h"
#include "mma_decode.cuh"
#include "pdl.cuh"
#include "split_reduce.cuh"

namespace mbwq {
namespace cuda {

constexpr int kLog2Warps = 3;
constexpr int kWarps = 1 << kLog2Warps;  // warps per CTA
static_assert(kWarps == kMmaWarps, "plan.h's split search counts these warps");
// A block width as a type, for the lambdas that specialise on it (0: not known).
template <int B>
using Width = std::integral_constant<int, B>;

// f(Width<bits>{}) for a valid width, f(Width<0>{}) for anything else (an invalid block).
template <typename F>
__device__ __forceinline__ void with_width(int bits, F&& f) {
  switch (bits) {
    case 2: f(Width<2>{}); break;
    case 3: f(Width<3>{}); break;
    case 4: f(Width<4>{}); break;
    case 5: f(Width<5>{}); break;
    case 6: f(Width<6>{}); break;
    case 8: f(Width<8>{}); break;
    default: f(Width<0>{});
  }
}

// True when a block of (bits, group) needs its group's scales and zeros: it is valid and its
// group differs from the last valid block's (`last`, updated; an invalid block resets it).
// The copy side and the compute side both walk the warp's blocks through this one rule, so a
// slot holds scales exactly when the consumer reloads them.
__device__ __forceinline__ bool starts_group(int bits, int group, int& last) {
  const bool start = bits != 0 && group != last;
  last = bits != 0 ? group : -1;
  return start;
}

// ---- the warp's blocks, the block table, the final reduction -------

// Where warp `warp` sits in its CTA of WC = 1 << log2_wc column warps x WK = kWarps / WC
// k-warps: column wc = warp % WC, k-warp kw = warp / WC. Shifts, which the compiler recomputes
// where needed (kernel start, finish_tile) instead of keeping quotients live through the loop.
struct WarpPlace {
  int wc, kw;
  __device__ __forceinline__ WarpPlace(int warp, int log2_wc)
      : wc(warp & ((1 << log2_wc) - 1)), kw(warp >> log2_wc) {}
};

// Every accumulator of a lane set to v (0 to start, NaN for a poisoned tile).
template <int MT, int QN>
__device__ __forceinline__ void fill_acc(FragC (&acc)[2 * QN][MT], float v) {
#pragma unroll
  for (int i = 0; i < 2 * QN; ++i)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][mt].r[e] = v;
}

// Four fp16 values negated by flipping their sign bits (scales' zeros -> -zero for the fma).
__device__ __forceinline__ uint2 negate_halves(uint2 v) {
  return make_uint2(v.x ^ 0x80008000u, v.y ^ 0x80008000u);
}

// This warp's contiguous range [wb, wb + nb) of 32-row blocks inside the CTA's K split
// [jb0, jb0 + len), k-warp kw of WK = 1 << log2_wk.
struct WarpRange {
  int jb0, len, wb, nb;
  __device__ __forceinline__ WarpRange(int K, int blocks_per_split, int kw, int log2_wk) {
    const int nblocks = K / kBlockRows;
    jb0 = blockIdx.y * blocks_per_split;
    len = max(0, min(blocks_per_split, nblocks - jb0));
    const int per = (len + (1 << log2_wk) - 1) >> log2_wk;
    wb = jb0 + kw * per;
    nb = max(0, min(per, len - kw * per));
  }
};

// A validated entry as the CTA's shared table holds it: one int2 {bits | group << 4, word},
// so that a block's width and group arrive in one 4-byte load (widths fit 4 bits).
__device__ __forceinline__ int2 pack_block(BlockMeta b) {
  return make_int2(b.bits | (b.group << 4), b.word);
}
__device__ __forceinline__ int packed_bits(int2 e) { return e.x & 15; }
__device__ __forceinline__ int packed_group(int2 e) { return e.x >> 4; }

// The CTA's block table, validated, into shared memory: (bits | group << 4, word) per block,
// bits == 0 for an entry that points outside qweight / scales (its output becomes NaN).
__device__ __forceinline__ void stage_table(int2* meta, const int32_t* __restrict__ blocks,
                                            const WarpRange& r, int R, int G) {
  for (int j = threadIdx.x; j < r.len; j += blockDim.x) {
    const BlockMeta b = load_block(blocks, r.jb0 + j, R, G);
    meta[j] = pack_block(b);
  }
  __syncthreads();
}

// Add the k-warps' partial sums in the fixed order kw = 0, 1, ..., WK - 1 (deterministic) and
// write the tile: y (T, + bias) when the grid has one K split, fp32 partials otherwise.
// Reuses shared memory from offset 0: every warp must be done with its table and ring.
template <typename T, int MT, int QN>
__device__ __forceinline__ void finish_tile(FragC (&acc)[2 * QN][MT], bool poisoned,
                                            unsigned char* smem, int log2_wc,
                                            const void* __restrict__ bias, int bias_kind,
                                            void* __restrict__ out, int M, int N) {
  // recomputed here rather than kept live through the main loop (registers)
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const WarpPlace place(threadIdx.x / 32, log2_wc);
  const int WC = 1 << log2_wc, WK = kWarps >> log2_wc, wc = place.wc, kw = place.kw;
  const int n_warp = (blockIdx.x * WC + wc) * 32 * QN;
  if (poisoned) fill_acc<MT, QN>(acc, qnan());
  constexpr int kRegs = 2 * QN * MT * 4;
  float* red = reinterpret_cast<float*>(smem);
  __syncthreads();
  if (kw > 0) {
    float* dst = red + ((kw - 1) * WC + wc) * kRegs * 32 + lane;
#pragma unroll
    for (int i = 0; i < 2 * QN; ++i)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[((i * MT + mt) * 4 + e) * 32] = acc[i][mt].r[e];
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
        for (int e = 0; e < 4; ++e) acc[i][mt].r[e] += src[((i * MT + mt) * 4 + e) * 32];
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
          v[c] = c < 2 ? acc[2 * q + c][mt].r[h] : acc[2 * q + c - 2][mt].r[2 + h];
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

// ---- the host side of a launch ----------------------------------------------------------

// What one call needs besides the kernel configuration.
template <typename T>
struct Call {
  const at::Tensor& xs;  // x gathered by the caller in XOrder::kMma (launch.h)
  const at::Tensor &qweight, &scales, &zeros, &blocks;
  const void* bias;
  int bias_kind;
  void* out;
  cudaStream_t stream;
};

// CTAs of kWarps warps and `smem` bytes of dynamic shared memory that the whole current device
// holds at once for `kernel` (whose shared-memory limit this raises to smem), computed once per
// device into `cache`.
template <typename Kernel>
int resident_ctas(int (&cache)[64], Kernel kernel, size_t smem) {
  return sm_count() * once_per_device(cache, [&](int) {
           set_smem_limit(kernel, smem);
           int n = 0;
           C10_CUDA_CHECK(
               cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kWarps * 32, smem));
           return n;
         });
}

// Launch an mma.sync GEMM kernel (gemm_mma.cu's argument list) on grid gc: with one K split
// it writes y (+ bias) itself, with several it writes fp32 partials that reduce_splits adds
// up in split order.
template <typename T, typename Kernel>
void launch_on_grid(Kernel kernel, const Grid& gc, size_t smem, const Call<T>& c) {
  const int M = c.xs.size(0), K = c.xs.size(1), N = c.qweight.size(1);
  const int R = c.qweight.size(0), G = c.scales.size(0);
  at::Tensor part;
  void* dst = c.out;
  if (gc.splits > 1) {
    part = at::empty({gc.splits, M, N}, c.xs.options().dtype(at::kFloat));
    dst = part.data_ptr();
  }
  launch_chained(kernel, dim3(gc.tiles, gc.splits), dim3(kWarps * 32), smem, c.stream,
                 reinterpret_cast<const T*>(c.xs.data_ptr()),
                 reinterpret_cast<const uint32_t*>(c.qweight.data_ptr()),
                 reinterpret_cast<const uint16_t*>(c.scales.data_ptr()),
                 reinterpret_cast<const uint16_t*>(c.zeros.data_ptr()),
                 reinterpret_cast<const int32_t*>(c.blocks.data_ptr()),
                 part.defined() ? nullptr : c.bias, c.bias_kind, dst, M, K, N, R, G,
                 __builtin_ctz(unsigned(gc.wc)), gc.blocks_per_split);
  if (part.defined()) reduce_splits<T>(part, c.bias, c.bias_kind, c.out, c.stream);
}

}  // namespace cuda
}  // namespace mbwq
