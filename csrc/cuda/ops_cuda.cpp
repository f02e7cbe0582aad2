// CUDA implementations of the mbwq ops: argument checks (checks.h, shared with the CPU kernels
// and mirrored by the fake kernels), device guard, current stream, and the shape-based choice
// of a gemm path. Host-only code, so it is a .cpp built by the C++ compiler like the CPU
// wrappers; the kernels and their launchers are in the .cu files (launch.h).
//
//   kTileMinM (33 on large layers) <= M <=      ->  gemm_tile.cu: tiles of 64 .. 256 tokens,
//   kTileMaxM on wgmma devices, fp16 / bf16 x,      weights decoded once per tile, exact fp16 W
//   K, N % 8 == 0
//   M <= kMmaMaxM (kMmaChunkedMaxM on large   ->  gemm_mma.cu: tensor cores, weights read
//   layers), fp16 / bf16 x, K, N % 8 == 0         once per row chunk, exact fp16 W
//   otherwise (larger M, fp32 x, odd N)         ->  gather x (perm, channel_scale) + dequantize
//                                                  W in stored order into x's dtype + cuBLAS
//
// Nothing here reads tensor values on the host or synchronises; every temporary comes from
// the caching allocator (at::empty), so both paths can be captured in a CUDA graph. Bad values
// in blocks / perm (which only a device read could see) are guarded inside the kernels: they
// produce NaN (or skip a row) instead of reading or writing out of bounds.
#include <ATen/ATen.h>

#include <algorithm>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "launch.h"

namespace mbwq {
namespace {

at::Tensor dequant_cuda(const at::Tensor& qweight_, const at::Tensor& scales_,
                        const at::Tensor& zeros_, const at::Tensor& blocks_,
                        const at::Tensor& perm_, at::ScalarType dtype) {
  check_weight_args(qweight_, scales_, zeros_, blocks_, perm_);
  check_dequant_dtype(dtype);
  const c10::cuda::CUDAGuard guard(qweight_.device());
  const at::Tensor qweight = qweight_.contiguous(), scales = scales_.contiguous(),
                   zeros = zeros_.contiguous(), blocks = blocks_.contiguous(),
                   perm = perm_.contiguous();
  const int64_t K = blocks.size(0) * kBlockRows, N = qweight.size(1);
  // The kernel writes fp16 / bf16 / fp32; any other dtype is the fp16 result converted, which
  // is what the CPU kernel returns too.
  const bool direct = dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat;
  at::Tensor out = at::empty({K, N}, scales.options().dtype(direct ? dtype : at::kHalf));
  cuda::dequant(qweight, scales, zeros, blocks, perm, out);
  return direct ? out : out.to(dtype);
}

at::Tensor gemm_cuda(const at::Tensor& x_, const at::Tensor& qweight_, const at::Tensor& scales_,
                     const at::Tensor& zeros_, const at::Tensor& blocks_, const at::Tensor& perm_,
                     const std::optional<at::Tensor>& channel_scale,
                     const std::optional<at::Tensor>& bias) {
  check_weight_args(qweight_, scales_, zeros_, blocks_, perm_);
  check_gemm_args(x_, qweight_, blocks_, channel_scale, bias);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), qweight = qweight_.contiguous(),
                   scales = scales_.contiguous(), zeros = zeros_.contiguous(),
                   blocks = blocks_.contiguous(), perm = perm_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) {  // empty sum: y = bias (or 0), rounded once
    at::Tensor acc = at::zeros({M, N}, x.options().dtype(at::kFloat));
    if (bias.has_value()) acc.add_(bias->to(at::kFloat));
    y.copy_(acc);
    return y;
  }

  // Many tokens on wgmma devices: the tile kernel, every weight decoded once per tile of 16 to
  // 256 tokens. (On these devices the row chunks below then serve 65+ rows only when the
  // MBWQ_TILE_* knobs move the tile kernel's range.)
  const bool wgmma = cuda::wgmma_available();
  const int min_knob = cuda::tuning_override("MBWQ_TILE_MIN_M");
  const int max_knob = cuda::tuning_override("MBWQ_TILE_MAX_M");
  const int64_t tile_min_m = min_knob > 0                                  ? min_knob
                             : K * N >= cuda::kTileLargeMinWeights ? cuda::kTileMinMLarge
                                                                    : cuda::kTileMinM;
  const int64_t tile_max_m = max_knob > 0 ? max_knob : cuda::kTileMaxM;
  if (wgmma && M >= tile_min_m && M <= tile_max_m &&
      cuda::mma_supported(x, qweight, scales, zeros)) {
    const int tokens = cuda::tile_tokens(M);
    const int64_t rows = (M + tokens - 1) / tokens * tokens;
    at::Tensor xs = at::empty({rows, K}, x.options());
    cuda::gather_x(x, perm, channel_scale, xs, cuda::XOrder::kTile, tokens);
    cuda::gemm_tile(xs, M, tokens, qweight, scales, zeros, blocks, bias, y);
    return y;
  }

  // Up to kMmaMaxM rows per kernel call; more as row chunks on large layers (each chunk reads
  // the weights once: a few reads still beat dequantizing all of W there; on small layers
  // dequant + cuBLAS wins from M = 65 on, launch.h). One x gather serves every chunk: the
  // mma.sync order keeps each row on its own. MBWQ_MMA_MAX_M moves the boundary.
  const int max_m_knob = cuda::tuning_override("MBWQ_MMA_MAX_M");
  const int64_t mma_max_m = max_m_knob > 0                           ? max_m_knob
                            : K * N >= cuda::kMmaChunkedMinWeights ? cuda::kMmaChunkedMaxM
                                                                    : cuda::kMmaMaxM;
  if (M <= mma_max_m && cuda::mma_supported(x, qweight, scales, zeros)) {
    at::Tensor xs = at::empty_like(x);
    cuda::gather_x(x, perm, channel_scale, xs, cuda::XOrder::kMma);
    for (int64_t m0 = 0; m0 < M; m0 += cuda::kMmaMaxM) {
      const int64_t rows = std::min(cuda::kMmaMaxM, M - m0);
      at::Tensor y_rows = y.narrow(0, m0, rows);
      cuda::gemm_mma(xs.narrow(0, m0, rows), qweight, scales, zeros, blocks, bias, y_rows);
    }
    return y;
  }

  // Large M (or a layer the tensor-core kernel cannot take): x in stored row order, W in stored row
  // order in x's dtype (fp16 bit-exact; bf16 / fp32 converted from the fp16 value), cuBLAS.
  at::Tensor xs = x;
  if (perm.numel() > 0 || channel_scale.has_value()) {
    xs = at::empty_like(x);
    cuda::gather_x(x, perm, channel_scale, xs, cuda::XOrder::kPlain);
  }
  at::Tensor Ws = at::empty({K, N}, x.options());
  cuda::dequant(qweight, scales, zeros, blocks, at::Tensor(perm.new_empty({0})), Ws);
  if (bias.has_value()) {
    // fp32 accumulation + bias in the epilogue, one rounding to x's dtype
    at::addmm_out(y, bias->to(x.scalar_type()), xs, Ws);
  } else {
    at::mm_out(y, xs, Ws);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mbwq, CUDA, m) {
  m.impl("dequant", &dequant_cuda);
  m.impl("gemm", &gemm_cuda);
}

}  // namespace mbwq
