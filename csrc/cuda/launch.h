// Host-side entry points of the CUDA kernels (defined in gemm_mma.cu, gemm_tile.cu, gather.cu
// and dequant.cu, called by ops_cuda.cpp). Every launcher runs on the current stream of the
// current device; the caller holds the device guard and has checked shapes (checks.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <initializer_list>
#include <optional>

namespace mbwq {
namespace cuda {

// Path boundaries, from shapes and the device only (ops_cuda.cpp: gemm_cuda):
//  * the tile kernel (gemm_tile.cu) takes kTileMinM (kTileMinMLarge on large layers) <= M <=
//    kTileMaxM on wgmma devices;
//  * the mma.sync kernel (gemm_mma.cu) 1 <= M <= kMmaMaxM, and on layers of at least
//    kMmaChunkedMinWeights weights up to kMmaChunkedMaxM as row chunks of kMmaMaxM (each chunk
//    reads the weights once);
//  * dequant + cuBLAS everything else (and fp32 x, K or N not a multiple of 8, misaligned data).
// mma.sync chunks against dequant + cuBLAS, H100: 8192 x 28672 4-bit, M = 128 in two chunks
// 238 us against 394 us, M = 256 in four 506 us against 432 us; 4096 x 14336, M = 128: 77 us
// against 111 us; 4096 x 4096, M = 128: 47 us against 35 us.
constexpr int64_t kMmaMaxM = 64;
constexpr int64_t kMmaChunkedMaxM = 192;
constexpr int64_t kMmaChunkedMinWeights = int64_t(1) << 25;  // K * N, e.g. 4096 x 8192
// The tile kernel (gemm_tile.cu; wgmma devices) takes kTileMinM <= M <= kTileMaxM, from
// kTileMinMLarge on layers of at least kTileLargeMinWeights weights (MBWQ_TILE_MIN_M /
// MBWQ_TILE_MAX_M move these). H200, 4-bit g128, fp16 x, against the paths
// before it (mma.sync / 128-token wgmma chunks up to 256 rows on large layers, else dequant +
// cuBLAS): 8192 x 28672 M = 128 203.2 -> 136.6 us, M = 256 408.3 -> 262.8 us, M = 1024 924.8
// against 974.1 us (so larger M keeps dequant + cuBLAS); 28672 x 8192 M = 256 363.9 -> 262.6
// us; 4096 x 4096 M = 128 29.7 -> 25.2 us, M = 256 33.9 against 35.7 us.
// 64-token tiles against the mma.sync kernel at M = 33-64, H200, A/B in one run (fp16 x; us):
// 8192 x 28672 4-bit M = 33 / 48 / 64: 113.9 -> 86.4, 117.1 -> 89.3, 121.5 -> 94.3;
// mixed 2.5 119.5 -> 92.4, 126.0 -> 98.4 at 64; 28672 x 8192 4-bit 102.9 -> 81.1, 108.8 ->
// 87.2; 4096 x 14336 35.5 -> 28.3, 38.4 -> 31.5 at 56; 14336 x 4096 34.2 -> 28.9 (mixed 2.5
// at 48 / 56: 37.0 / 37.7 against 37.5 / 38.2); bf16 8192 x 28672 133.4 -> 103.1 at 33. On
// 4096 x 4096 (2^24 weights) 4-bit lost at 33-48 (16.2 -> 16.7, 18.5 -> 20.1; bf16 17.3 ->
// 18.5) and mixed 2.5 won (20.1 -> 17.8), so small layers keep mma.sync up to 64. At M <= 32
// the tiles lost everywhere (M = 1: 48.1 -> 71.1, M = 32: 77.4 -> 80.6 us on 8192 x 28672).
constexpr int64_t kTileMinM = 65;
constexpr int64_t kTileMinMLarge = 33;
constexpr int64_t kTileLargeMinWeights = int64_t(1) << 25;  // K * N, e.g. 4096 x 8192
constexpr int64_t kTileMaxM = 256;

// True on devices with wgmma (compute capability 9.0, the sm_90a build), where the tile kernel
// (gemm_tile.cu) runs. MBWQ_MMA_NO_WGMMA=1 turns it off for comparison.
bool wgmma_available();

// True when the tensor-core kernel may take this layer: fp16 / bf16 activations, K and N
// multiples of 8 (16-byte copies of qweight rows, scales and zeros) and 16-byte aligned data.
bool mma_supported(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const at::Tensor& zeros);

// Where a consumer expects stored row k of x (gather.cu): plain (k, for cuBLAS) or the 16-byte
// chunk orders the tensor-core kernels read their B operand in (mma.sync, and the wgmma tiles of
// gemm_tile, in which each block of a tile's tokens x 32 rows of x is one contiguous run, rows
// padded with zeros to a multiple of the tile's tokens).
enum class XOrder { kPlain, kMma, kTile };

// y[M, N] = xs @ Wstored + bias on tensor cores (mma.sync), weights read once per call, for
// 1 <= M <= kMmaMaxM. xs: round(x * cs)[:, perm] as gather_x writes it in XOrder::kMma
// (16-byte aligned).
void gemm_mma(const at::Tensor& xs, const at::Tensor& qweight, const at::Tensor& scales,
              const at::Tensor& zeros, const at::Tensor& blocks,
              const std::optional<at::Tensor>& bias, at::Tensor& y);

// The grid of the mma.sync kernels (gemm_mma.cu): WC column warps of
// warp_cols columns per CTA (one of wc_options) and K splits of blocks_per_split 32-row blocks,
// the cheapest under a cost model of waves x (blocks per warp + `ramp`) plus the partials'
// traffic, for `slots` resident CTAs. MBWQ_MMA_SPLITS forces the splits, and MBWQ_MMA_WC the
// column warps where the kernel takes any number of them (wc_knob).
struct GridChoice {
  int wc, tiles, splits, blocks_per_split;
};
GridChoice choose_grid(int nblocks, int N, int warp_cols, int M, double weight_bytes, int slots,
                       int ramp, std::initializer_list<int> wc_options, bool wc_knob);

// The tokens of the tile kernel's CTA tiles for M rows: 16, 32, 64, 128 or 256 (the fewest
// that cover M, or MBWQ_TILE_TOKENS).
int tile_tokens(int64_t M);

// y[M, N] = xs @ Wstored + bias for many tokens on wgmma devices (wgmma_available()): CTA tiles
// of `tokens` tokens (tile_tokens(M)) x 128 * min(4, 256 / tokens) columns, every weight decoded
// once per tile. xs: gathered in XOrder::kTile with tiles of `tokens` rows,
// ceil(M / tokens) * tokens rows.
void gemm_tile(const at::Tensor& xs, int64_t M, int tokens, const at::Tensor& qweight,
               const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& blocks,
               const std::optional<at::Tensor>& bias, at::Tensor& y);

// Tuning hook for benchmarks (gemm_mma.cu): the positive integer in environment variable `name`,
// read at each call, else 0.
int tuning_override(const char* name);

// compute(device) for the current device, computed once per device into `cache` (at least 1;
// devices from 64 on share the last entry): for values constant for the process.
template <typename F>
int once_per_device(int (&cache)[64], F compute) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int& v = cache[std::min(dev, 63)];
  if (v == 0) v = std::max(compute(dev), 1);
  return v;
}

// Raises `kernel`'s dynamic shared-memory limit to `bytes` on the current device (above 48 KB
// a launch fails without it).
template <typename Kernel>
void set_smem_limit(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}
// The same once per device (`cache`: one per kernel instantiation).
template <typename Kernel>
void allow_smem_once(int (&cache)[64], Kernel kernel, size_t bytes) {
  once_per_device(cache, [&](int) {
    set_smem_limit(kernel, bytes);
    return 1;
  });
}

// Multiprocessor count and compute-capability major of the current device (read once per
// device).
int sm_count();
int compute_capability_major();

// out[perm[k], n] (or out[k, n] when perm is empty) = fp16(code * scale - zero), as out's dtype.
void dequant(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
             const at::Tensor& blocks, const at::Tensor& perm, at::Tensor& out);

// xs[m, k'] = round_x(x[m, perm[k]] * cs[perm[k]]) in x's dtype, k' the position of stored row
// k in `order` (NaN for a perm entry outside [0, K)); chained to the next kernel (pdl.cuh).
// tile_tokens: the tile height of XOrder::kTile (a power of two >= 8), else unused.
void gather_x(const at::Tensor& x, const at::Tensor& perm, const std::optional<at::Tensor>& cs,
              at::Tensor& xs, XOrder order, int tile_tokens = 0);

// The kernels read channel_scale / bias as float16, bfloat16 or float32; anything else is
// converted to float32 first (what the CPU kernel computes with).
at::Tensor aux_tensor(const at::Tensor& t);
int aux_kind(const std::optional<at::Tensor>& t);

}  // namespace cuda
}  // namespace mbwq
