// CUDA implementations of the mbwq ops: argument checks (checks.h, shared with the CPU kernels
// and mirrored by the fake kernels), device guard, current stream, and the execution of the
// plan that ../plan.h makes from shapes, dtypes, alignment and the device:
//
//   GemmPath::kTile           gather x in tile order, gemm_tile.cu (wgmma, Hopper)
//   GemmPath::kMma            gather x in mma order, gemm_mma.cu per row chunk (mma.sync)
//   GemmPath::kDequantMatmul  gather x (perm, channel_scale) + dequantize W in stored order
//                             into x's dtype + cuBLAS
//
// Host-only code, so it is a .cpp built by the C++ compiler like the CPU wrappers; the kernels
// and their launchers are in the .cu files (launch.h).
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
  const auto aligned16 = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  const bool half = x.scalar_type() == at::kHalf;
  const GemmPlan plan =
      plan_gemm(M, K, N, qweight.size(0), half || x.scalar_type() == at::kBFloat16, half,
                aligned16(x) && aligned16(qweight) && aligned16(scales) && aligned16(zeros),
                cuda::device_facts(), knobs());

  switch (plan.path) {
    case GemmPath::kEmpty: {
      if (M == 0 || N == 0) return y;
      at::Tensor acc = at::zeros({M, N}, x.options().dtype(at::kFloat));  // empty sum (K = 0)
      if (bias.has_value()) acc.add_(bias->to(at::kFloat));
      y.copy_(acc);
      return y;
    }
    case GemmPath::kTile: {
      const int tokens = plan.tile_tokens;
      const int64_t rows = (M + tokens - 1) / tokens * tokens;
      at::Tensor xs = at::empty({rows, K}, x.options());
      cuda::gather_x(x, perm, channel_scale, xs, cuda::XOrder::kTile, tokens);
      cuda::gemm_tile(xs, M, tokens, qweight, scales, zeros, blocks, bias, y);
      return y;
    }
    case GemmPath::kMma: {
      // One gather serves every row chunk: the mma.sync order keeps each row on its own.
      at::Tensor xs = at::empty_like(x);
      cuda::gather_x(x, perm, channel_scale, xs, cuda::XOrder::kMma);
      for (int64_t m0 = 0; m0 < M; m0 += plan.chunk_rows) {
        const int64_t rows = std::min(plan.chunk_rows, M - m0);
        at::Tensor y_rows = y.narrow(0, m0, rows);
        cuda::gemm_mma(xs.narrow(0, m0, rows), qweight, scales, zeros, blocks, bias, y_rows);
      }
      return y;
    }
    case GemmPath::kDequantMatmul:
      break;
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
