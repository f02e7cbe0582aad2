// Small-M gemm kernels (M <= kGemvMaxM, launch.h): every packed weight byte is read from device
// memory once per call.
//
// Work split (one CTA = 8 warps = 256 threads):
//
//            columns n ->   tile t = 128 columns = 32 lanes x 4 adjacent columns
//          +------------+------------+--
//  stored  | split 0    |            |      blockIdx.x = column tile, blockIdx.y = K split.
//  rows k  | kb blocks  |            |      Inside a CTA, warp w takes blocks w, w+8, w+16, ...
//    |     +------------+------------+--    of the CTA's K slice; lane l owns columns
//    v     | split 1    |            |      4l..4l+3 of the tile and reads them as ONE 16-byte
//          |            |            |      load per qweight row (a warp reads 512 contiguous
//          +------------+------------+--    bytes per row: fully coalesced).
//
// 1. The CTA gathers its K slice of x once into shared memory, in stored row order and in
//    fp32: xs[r][m] = round_T(x[m, perm[k]] * channel_scale[perm[k]]) (the same rounding as
//    the CPU kernel), plus the per-block sums Σ_r xs[r][m] used below.
// 2. Each warp walks its 32-row blocks; `switch (bits)` picks a fully unrolled decoder
//    (decode.cuh). Within a block every row shares one scale and zero per column, so
//        Σ_r x_r (c_r·s − z) = s·Σ_r x_r c_r − z·Σ_r x_r
//    and the inner loop is one LOP3 + one FADD per code and one FFMA per (code, row of x).
//    All M rows of x are applied to a weight while it sits in registers: the weight is read
//    once no matter how large M is (M > 8 loops over 8-row chunks of x; the words of the
//    chunk loop come back from L1/L2, not DRAM).
// 3. The 8 warps' partial sums are added in a fixed order through shared memory. With one
//    K split the CTA adds the bias and writes y; otherwise it writes fp32 partials to a
//    workspace from the caching allocator and a second kernel adds the splits in order.
//    No atomics: the result is bitwise reproducible.
//
// The number of splits depends on shapes only (M, K, N, the SM count): enough CTAs to fill
// the GPU when N is small, and a K slice small enough for the gathered x to fit in
// shared memory.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "../format.h"
#include "common.cuh"
#include "decode.cuh"

namespace mbwq {
namespace cuda {
namespace gemv_detail {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileCols = 128;            // 32 lanes x 4 columns
constexpr int kSmemX = 64 * 1024;         // bytes for the gathered x slice + block sums

struct GemvArgs {
  const void* x;
  const void* cs;
  const int* perm;  // nullptr: identity
  const uint4* qweight;
  const uint2* scales;
  const uint2* zeros;
  const int* blocks;
  const void* bias;
  void* out;
  float* partial;  // [S, M, N] when S > 1
  int M, Mpad, K, N, R, G, nblocks, kb, S;
  int cs_kind, bias_kind;
};

template <int MT>
__device__ __forceinline__ void load_x(const float* p, float (&v)[MT]) {
  if constexpr (MT == 1) {
    v[0] = p[0];
  } else if constexpr (MT == 2) {
    const float2 a = *reinterpret_cast<const float2*>(p);
    v[0] = a.x, v[1] = a.y;
  } else {
#pragma unroll
    for (int i = 0; i < MT; i += 4) {
      const float4 a = *reinterpret_cast<const float4*>(p + i);
      v[i] = a.x, v[i + 1] = a.y, v[i + 2] = a.z, v[i + 3] = a.w;
    }
  }
}

// The words of one block for the lane's 4 columns (only the first `bits` of wv are loaded),
// plus its scales and zeros. Issued one block ahead of the arithmetic (see gemv_kernel).
struct BlockWords {
  uint4 w[8];
  uint2 s, z;
};

__device__ __forceinline__ void load_words(const GemvArgs& a, const int4& b, int q, int N4,
                                           BlockWords& out) {
  const uint4* p = a.qweight + static_cast<int64_t>(b.y) * N4 + q;
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i < b.x) out.w[i] = __ldg(p + static_cast<int64_t>(i) * N4);
  if (b.x) {
    out.s = __ldg(a.scales + static_cast<int64_t>(b.z) * N4 + q);
    out.z = __ldg(a.zeros + static_cast<int64_t>(b.z) * N4 + q);
  }
}

// One 32-row block of width BITS for the lane's 4 columns and MT rows of x.
// xr = xs row 0 of the block at chunk offset, xsum = the block's Σ_r xs[r][m] at chunk offset.
template <int BITS, int MT, typename T>
__device__ __forceinline__ void block_compute(const BlockWords& bw, int Mpad, const float* xr,
                                              const float* xsum, float (&acc)[MT][4]) {
  uint32_t w[4][BITS];  // w[column][word]
#pragma unroll
  for (int i = 0; i < BITS; ++i)
    w[0][i] = bw.w[i].x, w[1][i] = bw.w[i].y, w[2][i] = bw.w[i].z, w[3][i] = bw.w[i].w;
  const uint2 sv = bw.s, zv = bw.z;

  float dot[MT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) dot[m][c] = 0.f;

#pragma unroll
  for (int r = 0; r < 32; ++r) {
    float xv[MT];
    load_x<MT>(xr + r * Mpad, xv);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float code = code_f32<BITS>(w[c], r);
#pragma unroll
      for (int m = 0; m < MT; ++m) dot[m][c] = fmaf(xv[m], code, dot[m][c]);
    }
  }

  const __half2 s01 = *reinterpret_cast<const __half2*>(&sv.x);
  const __half2 s23 = *reinterpret_cast<const __half2*>(&sv.y);
  const __half2 z01 = *reinterpret_cast<const __half2*>(&zv.x);
  const __half2 z23 = *reinterpret_cast<const __half2*>(&zv.y);
  const float s[4] = {__low2float(s01), __high2float(s01), __low2float(s23), __high2float(s23)};
  const float z[4] = {__low2float(z01), __high2float(z01), __low2float(z23), __high2float(z23)};
  float xs_sum[MT];
  load_x<MT>(xsum, xs_sum);
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c)
      acc[m][c] = fmaf(s[c], dot[m][c], fmaf(-z[c], xs_sum[m], acc[m][c]));
}

template <int MT, typename T>
__device__ __forceinline__ void compute_block(int bits, const BlockWords& bw, int Mpad,
                                              const float* xr, const float* xb,
                                              float (&acc)[MT][4]) {
  switch (bits) {
    case 2: block_compute<2, MT, T>(bw, Mpad, xr, xb, acc); break;
    case 3: block_compute<3, MT, T>(bw, Mpad, xr, xb, acc); break;
    case 4: block_compute<4, MT, T>(bw, Mpad, xr, xb, acc); break;
    case 5: block_compute<5, MT, T>(bw, Mpad, xr, xb, acc); break;
    case 6: block_compute<6, MT, T>(bw, Mpad, xr, xb, acc); break;
    case 8: block_compute<8, MT, T>(bw, Mpad, xr, xb, acc); break;
    default:  // invalid table entry (load_block): the output becomes NaN
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][c] = qnan();
  }
}

// Load and compute one block in one go (no prefetch): only BITS words are ever live.
template <int BITS, int MT, typename T>
__device__ __forceinline__ void block_direct(const GemvArgs& a, const int4& b, int q, int N4,
                                             const float* xr, const float* xb,
                                             float (&acc)[MT][4]) {
  BlockWords bw;
  const uint4* p = a.qweight + static_cast<int64_t>(b.y) * N4 + q;
#pragma unroll
  for (int i = 0; i < BITS; ++i) bw.w[i] = __ldg(p + static_cast<int64_t>(i) * N4);
  bw.s = __ldg(a.scales + static_cast<int64_t>(b.z) * N4 + q);
  bw.z = __ldg(a.zeros + static_cast<int64_t>(b.z) * N4 + q);
  block_compute<BITS, MT, T>(bw, a.Mpad, xr, xb, acc);
}

template <int MT, typename T>
__device__ __forceinline__ void direct_block(const GemvArgs& a, const int4& b, int q, int N4,
                                             const float* xr, const float* xb,
                                             float (&acc)[MT][4]) {
  switch (b.x) {
    case 2: block_direct<2, MT, T>(a, b, q, N4, xr, xb, acc); break;
    case 3: block_direct<3, MT, T>(a, b, q, N4, xr, xb, acc); break;
    case 4: block_direct<4, MT, T>(a, b, q, N4, xr, xb, acc); break;
    case 5: block_direct<5, MT, T>(a, b, q, N4, xr, xb, acc); break;
    case 6: block_direct<6, MT, T>(a, b, q, N4, xr, xb, acc); break;
    case 8: block_direct<8, MT, T>(a, b, q, N4, xr, xb, acc); break;
    default:
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][c] = qnan();
  }
}

__host__ __device__ constexpr int round4(int v) { return (v + 3) & ~3; }

// T = __half or __nv_bfloat16 (fp32 activations take the dequant + cuBLAS path).
template <int MT, typename T>
__global__ void __launch_bounds__(kThreads, 2) gemv_kernel(const GemvArgs a) {
  extern __shared__ float4 smem4[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int j0 = split * a.kb;
  const int nb = min(a.kb, a.nblocks - j0);
  const int rows = nb * 32;
  const int Mpad = a.Mpad;
  // Double-buffer the weight words where registers allow (few rows of x).
  constexpr bool kPrefetch = MT <= 2;

  // shared memory: xs [kb*32][Mpad] | xsum [kb][Mpad] | red [warps][MT][128] | blk [kb] int4
  float* xs = reinterpret_cast<float*>(smem4);
  float* xsum = xs + a.kb * 32 * Mpad;
  float* red = xsum + round4(a.kb * Mpad);
  int4* blk = reinterpret_cast<int4*>(red + kWarps * MT * kTileCols);

  for (int j = tid; j < nb; j += kThreads) {
    const BlockMeta b = load_block(a.blocks, j0 + j, a.R, a.G);
    blk[j] = make_int4(b.bits, b.word, b.group, 0);
  }
  // Start loading each warp's first block now: its latency hides behind the x gather
  // (double-buffered kernels only).
  const int N4 = a.N >> 2;
  const int q = tile * 32 + lane;  // this lane's column quad
  const bool active = q < N4;
  BlockWords buf[2];
  if (kPrefetch && active && warp < nb) {
    const BlockMeta b = load_block(a.blocks, j0 + warp, a.R, a.G);
    load_words(a, make_int4(b.bits, b.word, b.group, 0), q, N4, buf[0]);
  }
  // Gather: r runs fastest so that an identity perm reads x coalesced.
  // Eight independent loads per thread per round, so the L2 latency of the scattered reads
  // is paid once per round, not once per element.
  const T* x = static_cast<const T*>(a.x);
  const int total = rows * Mpad;
  for (int base = tid; base < total; base += 8 * kThreads) {
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int i = base + u * kThreads;
      const int m = i / rows, r = i - m * rows;
      v[u] = 0.f;  // padding rows of the last chunk multiply real weights by 0
      if (i < total && m < a.M) {
        const int k = j0 * 32 + r;
        const int p = a.perm ? __ldg(a.perm + k) : k;
        if (static_cast<unsigned>(p) < static_cast<unsigned>(a.K)) {
          v[u] = Cvt<T>::to_f(x[static_cast<int64_t>(m) * a.K + p]);
          if (a.cs_kind != kAuxNone) v[u] = round_as<T>(v[u] * aux_load(a.cs, a.cs_kind, p));
        } else {
          v[u] = qnan();  // perm entry out of range: poison instead of reading outside x
        }
      }
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int i = base + u * kThreads;
      if (i < total) {
        const int m = i / rows, r = i - m * rows;
        xs[r * Mpad + m] = v[u];
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < nb * Mpad; i += kThreads) {
    const int j = i / Mpad, m = i - j * Mpad;
    const float* p = xs + j * 32 * Mpad + m;
    float s = 0.f;
#pragma unroll 8
    for (int r = 0; r < 32; ++r) s += p[r * Mpad];
    xsum[i] = s;
  }
  __syncthreads();

  for (int c0 = 0; c0 < Mpad; c0 += MT) {
    float acc[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[m][c] = 0.f;
    if (active && warp < nb) {
      if constexpr (kPrefetch) {
        if (c0 > 0) load_words(a, blk[warp], q, N4, buf[0]);
        // Double-buffered walk over the warp's blocks: the words of block j + 8 are in flight
        // while block j is decoded, so each warp keeps two blocks of loads outstanding.
        int j = warp;
        int4 b = blk[j];
        while (true) {  // unrolled by two so that both buffers keep fixed registers
          int jn = j + kWarps;
          int4 bn = make_int4(0, 0, 0, 0);
          if (jn < nb) bn = blk[jn], load_words(a, bn, q, N4, buf[1]);
          compute_block<MT, T>(b.x, buf[0], Mpad, xs + j * 32 * Mpad + c0, xsum + j * Mpad + c0, acc);
          if (jn >= nb) break;
          j = jn, b = bn;
          jn = j + kWarps;
          if (jn < nb) bn = blk[jn], load_words(a, bn, q, N4, buf[0]);
          compute_block<MT, T>(b.x, buf[1], Mpad, xs + j * 32 * Mpad + c0, xsum + j * Mpad + c0, acc);
          if (jn >= nb) break;
          j = jn, b = bn;
        }
      } else {
        for (int j = warp; j < nb; j += kWarps) {
          direct_block<MT, T>(a, blk[j], q, N4, xs + j * 32 * Mpad + c0, xsum + j * Mpad + c0, acc);
        }
      }
    }
    // Fixed-order reduction over the 8 warps.
    float* rw = red + warp * MT * kTileCols + lane * 4;
#pragma unroll
    for (int m = 0; m < MT; ++m)
      *reinterpret_cast<float4*>(rw + m * kTileCols) =
          make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
    __syncthreads();
    for (int o = tid; o < MT * kTileCols; o += kThreads) {
      const int m = o / kTileCols, col = o - m * kTileCols;
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += red[(w * MT + m) * kTileCols + col];
      const int mg = c0 + m, n = tile * kTileCols + col;
      if (mg < a.M && n < a.N) {
        const int64_t idx = static_cast<int64_t>(mg) * a.N + n;
        if (a.S == 1) {
          if (a.bias_kind != kAuxNone) s += aux_load(a.bias, a.bias_kind, n);
          static_cast<T*>(a.out)[idx] = Cvt<T>::from_f(s);
        } else {
          a.partial[static_cast<int64_t>(split) * a.M * a.N + idx] = s;
        }
      }
    }
    __syncthreads();
  }
}

// y = Σ_s partial[s] (in order s = 0, 1, ...) + bias, rounded once to T.
template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ partial, int S, int64_t MN, int N,
                                     const void* bias, int bias_kind, T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < MN;
       i += stride) {
    float s = 0.f;
    for (int k = 0; k < S; ++k) s += partial[k * MN + i];
    if (bias_kind != kAuxNone) s += aux_load(bias, bias_kind, i % N);
    out[i] = Cvt<T>::from_f(s);
  }
}

template <int MT, typename T>
void launch_gemv(GemvArgs a, int tiles, size_t smem, cudaStream_t stream) {
  auto kernel = gemv_kernel<MT, T>;
  // Raise the dynamic shared-memory limit once per device for this instantiation.
  static bool raised[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && !raised[dev]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kSmemX + 48 * 1024));
    raised[dev] = true;
  }
  kernel<<<dim3(tiles, a.S), kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_reduce(const float* partial, int S, int64_t MN, int N, const void* bias,
                   int bias_kind, void* out, cudaStream_t stream) {
  const int threads = 256;
  const int64_t want = (MN + threads - 1) / threads;
  const int grid = static_cast<int>(std::min<int64_t>(want, 65535));
  splitk_reduce_kernel<T><<<grid, threads, 0, stream>>>(partial, S, MN, N, bias, bias_kind,
                                                        static_cast<T*>(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_gemv(int MT, const GemvArgs& a, int tiles, size_t smem, cudaStream_t stream) {
  switch (MT) {
    case 1: launch_gemv<1, T>(a, tiles, smem, stream); break;
    case 2: launch_gemv<2, T>(a, tiles, smem, stream); break;
    case 4: launch_gemv<4, T>(a, tiles, smem, stream); break;
    default: launch_gemv<8, T>(a, tiles, smem, stream); break;
  }
}

}  // namespace gemv_detail
}  // namespace cuda
}  // namespace mbwq
