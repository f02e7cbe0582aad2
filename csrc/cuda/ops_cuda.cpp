// CUDA implementations of the mbwq ops: argument checks (checks.h, shared with the CPU kernels
// and mirrored by the fake kernels), device guard, current stream, and the execution of the
// plan that ../plan.h makes from shapes, dtypes, alignment and the device:
//
//   GemmPath::kTile           gather x in tile order, gemm_tile.cu (wgmma, Hopper)
//   GemmPath::kMma            gather x in mma order, gemm_mma.cu per row chunk (mma.sync)
//   GemmPath::kDequantMatmul  gather x (perm, channel_scale) + dequantize W in stored order
//                             into x's dtype + cuBLAS (dequant_matmul: W whole or in column
//                             chunks, optionally overlapped on a side stream)
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
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
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

// A CUDA event for ordering two streams (no timing), destroyed with its scope; the work it
// marks finishes regardless.
class StreamEvent {
 public:
  StreamEvent() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming)); }
  ~StreamEvent() { cudaEventDestroy(e_); }
  StreamEvent(const StreamEvent&) = delete;
  StreamEvent& operator=(const StreamEvent&) = delete;
  void record(cudaStream_t s) { C10_CUDA_CHECK(cudaEventRecord(e_, s)); }
  void block(cudaStream_t s) { C10_CUDA_CHECK(cudaStreamWaitEvent(s, e_, 0)); }

 private:
  cudaEvent_t e_ = nullptr;
};

// y = xs @ W (+ bias) with W dequantized in x's dtype, in stored row order, a column chunk of
// plan.chunk_cols at a time (all of N unless the plan says otherwise) into a reused buffer,
// each chunk multiplied by cuBLAS into its columns of y. plan.overlap_chunks: chunks alternate
// between two buffers, and chunk i + 1 is dequantized on a side stream while chunk i's
// multiplication runs. Events order every use of a buffer; the current stream waits for the
// side stream's last chunk before it multiplies it, so the side stream's work ends inside this
// call (also inside a CUDA graph capture, where the events become graph edges).
void dequant_matmul(const at::Tensor& xs, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros, const at::Tensor& blocks, const at::Tensor& no_perm,
                    const std::optional<at::Tensor>& bias, const GemmPlan& plan, at::Tensor& y) {
  const int64_t K = xs.size(1), N = y.size(1);
  const int64_t cols = plan.chunk_cols > 0 ? std::min(plan.chunk_cols, N) : N;
  const bool overlap = plan.overlap_chunks && cols < N;
  at::Tensor buffers[2] = {at::empty({K, cols}, xs.options()),
                           overlap ? at::empty({K, cols}, xs.options()) : at::Tensor()};
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(xs.scalar_type())) : std::nullopt;
  const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream();
  std::optional<c10::cuda::CUDAStream> side;
  std::optional<StreamEvent> start, ready[2], consumed[2];
  if (overlap) {
    side = c10::cuda::getStreamFromPool(false, xs.device().index());
    start.emplace(), ready[0].emplace(), ready[1].emplace();
    consumed[0].emplace(), consumed[1].emplace();
    start->record(main);  // the side stream's work comes after everything queued so far
    start->block(*side);
  }
  for (int64_t i = 0, n0 = 0; n0 < N; ++i, n0 += cols) {
    const int64_t w = std::min(cols, N - n0);
    at::Tensor W_part = buffers[overlap ? i % 2 : 0].narrow(1, 0, w);
    if (overlap) {
      const c10::cuda::CUDAStreamGuard on_side(*side);
      if (i >= 2) consumed[i % 2]->block(*side);  // chunk i - 2's multiplication read it
      cuda::dequant(qweight, scales, zeros, blocks, no_perm, W_part, n0);
      ready[i % 2]->record(*side);
      ready[i % 2]->block(main);
    } else {
      cuda::dequant(qweight, scales, zeros, blocks, no_perm, W_part, n0);
    }
    at::Tensor y_part = w == N ? y : y.narrow(1, n0, w);
    if (b.has_value()) {
      // fp32 accumulation + bias in the epilogue, one rounding to x's dtype
      at::addmm_out(y_part, w == N ? *b : b->narrow(0, n0, w), xs, W_part);
    } else {
      at::mm_out(y_part, xs, W_part);
    }
    if (overlap) consumed[i % 2]->record(main);
  }
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
  dequant_matmul(xs, qweight, scales, zeros, blocks, perm.new_empty({0}), bias, plan, y);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mbwq, CUDA, m) {
  m.impl("dequant", &dequant_cuda);
  m.impl("gemm", &gemm_cuda);
}

}  // namespace mbwq
