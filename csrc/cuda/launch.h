// Host-side entry points of the CUDA kernels (defined in gemm_mma.cu, gemm_tile.cu, gather.cu
// and dequant.cu, called by ops_cuda.cpp, which follows plan_gemm: ../plan.h). Every launcher
// runs on the current stream of the current device; the caller holds the device guard and has
// checked shapes (checks.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <optional>

#include "../plan.h"
#include "device.h"

namespace mbwq {
namespace cuda {

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
// 1 <= M <= kMmaMaxM, with the configuration select_mma_config picks for M (plan.h).
// xs: round(x * cs)[:, perm] as gather_x writes it in XOrder::kMma (16-byte aligned).
void gemm_mma(const at::Tensor& xs, const at::Tensor& qweight, const at::Tensor& scales,
              const at::Tensor& zeros, const at::Tensor& blocks,
              const std::optional<at::Tensor>& bias, at::Tensor& y);

// y[M, N] = xs @ Wstored + bias for many tokens on wgmma devices (wgmma_available()): CTA tiles
// of `tokens` tokens (plan.h: tile_tokens) x tile_columns(tokens) columns, every weight decoded
// once per tile, on the grid tile_grid chooses. xs: gathered in XOrder::kTile with tiles of
// `tokens` rows, ceil(M / tokens) * tokens rows.
void gemm_tile(const at::Tensor& xs, int64_t M, int tokens, const at::Tensor& qweight,
               const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& blocks,
               const std::optional<at::Tensor>& bias, at::Tensor& y);

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
