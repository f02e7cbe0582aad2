// Host side of the small-M gemm: shape-based launch plan (K splits, x chunking) and the
// split-K reduction. Kernels and the work split are drawn in gemv_kernels.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "gemv_kernels.cuh"
#include "launch.h"

namespace mbwq {
namespace cuda {
namespace gemv_detail {
// instantiated in gemv_f16.cu, gemv_bf16.cu
extern template void run_gemv<__half>(int, const GemvArgs&, int, size_t, cudaStream_t);
extern template void run_gemv<__nv_bfloat16>(int, const GemvArgs&, int, size_t, cudaStream_t);
extern template void run_reduce<__half>(const float*, int, int64_t, int, const void*, int, void*, cudaStream_t);
extern template void run_reduce<__nv_bfloat16>(const float*, int, int64_t, int, const void*, int, void*, cudaStream_t);
}  // namespace gemv_detail

// Multiprocessor count of the current device, read once per device (a shape input of the
// split heuristic, constant for the process).
int sm_count() {
  static int cached[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 64) dev = 63;
  if (cached[dev] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    cached[dev] = v > 0 ? v : 1;
  }
  return cached[dev];
}

namespace {
using namespace gemv_detail;

bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace

bool gemv_supported(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros) {
  return (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
         qweight.size(1) % 4 == 0 && aligned(qweight.data_ptr(), 16) &&
         aligned(scales.data_ptr(), 8) && aligned(zeros.data_ptr(), 8);
}

at::Tensor aux_tensor(const at::Tensor& t) {
  const auto dt = t.scalar_type();
  at::Tensor c = (dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat) ? t : t.to(at::kFloat);
  return c.contiguous();
}

int aux_kind(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return kAuxNone;
  switch (t->scalar_type()) {
    case at::kHalf: return kAuxHalf;
    case at::kBFloat16: return kAuxBF16;
    default: return kAuxFloat;
  }
}

void gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
          const at::Tensor& zeros, const at::Tensor& blocks, const at::Tensor& perm,
          const std::optional<at::Tensor>& cs, const std::optional<at::Tensor>& bias,
          at::Tensor& y) {
  const int M = static_cast<int>(x.size(0));
  const int K = static_cast<int>(x.size(1));
  const int N = static_cast<int>(qweight.size(1));
  const int nblocks = static_cast<int>(blocks.size(0));
  const int MT = M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8;
  const int Mpad = (M + MT - 1) / MT * MT;
  const int tiles = (N + kTileCols - 1) / kTileCols;

  // K split: aim for ~4 CTAs per SM (two resident, two more to even out the tail), at least
  // 16 blocks (2 per warp) per CTA, and a gathered x slice that fits kSmemX.
  const int sms = sm_count();
  const int per_block = 32 * Mpad * 4 + Mpad * 4 + 16;
  const int kb_max = std::max(1, kSmemX / per_block);
  int S = std::max(1, (4 * sms + tiles - 1) / tiles);
  S = std::min(S, std::max(1, nblocks / 16));
  int kb = (nblocks + S - 1) / S;
  kb = std::min((kb + 7) / 8 * 8, kb_max);
  kb = std::min(kb, nblocks);
  S = (nblocks + kb - 1) / kb;

  const size_t smem = sizeof(float) * (static_cast<size_t>(kb) * 32 * Mpad + round4(kb * Mpad) +
                                       static_cast<size_t>(kWarps) * MT * kTileCols) +
                      sizeof(int4) * kb;

  const at::Tensor cs_t = cs.has_value() ? aux_tensor(*cs) : at::Tensor();
  const at::Tensor bias_t = bias.has_value() ? aux_tensor(*bias) : at::Tensor();
  at::Tensor partial;
  if (S > 1) partial = at::empty({S, M, N}, x.options().dtype(at::kFloat));

  GemvArgs a;
  a.x = x.data_ptr();
  a.cs = cs_t.defined() ? cs_t.data_ptr() : nullptr;
  a.perm = perm.numel() > 0 ? perm.data_ptr<int32_t>() : nullptr;
  a.qweight = static_cast<const uint4*>(qweight.data_ptr());
  a.scales = static_cast<const uint2*>(scales.data_ptr());
  a.zeros = static_cast<const uint2*>(zeros.data_ptr());
  a.blocks = blocks.data_ptr<int32_t>();
  a.bias = bias_t.defined() ? bias_t.data_ptr() : nullptr;
  a.out = y.data_ptr();
  a.partial = S > 1 ? partial.data_ptr<float>() : nullptr;
  a.M = M, a.Mpad = Mpad, a.K = K, a.N = N;
  a.R = static_cast<int>(qweight.size(0));
  a.G = static_cast<int>(scales.size(0));
  a.nblocks = nblocks, a.kb = kb, a.S = S;
  a.cs_kind = cs_t.defined() ? aux_kind(cs_t) : kAuxNone;
  a.bias_kind = bias_t.defined() ? aux_kind(bias_t) : kAuxNone;

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kHalf: run_gemv<__half>(MT, a, tiles, smem, stream); break;
    case at::kBFloat16: run_gemv<__nv_bfloat16>(MT, a, tiles, smem, stream); break;
    default: TORCH_CHECK(false, "mbwq: internal: no small-M kernel for ", x.scalar_type());
  }
  if (S > 1) {
    const int64_t MN = static_cast<int64_t>(M) * N;
    switch (x.scalar_type()) {
      case at::kHalf: run_reduce<__half>(a.partial, S, MN, N, a.bias, a.bias_kind, a.out, stream); break;
      case at::kBFloat16: run_reduce<__nv_bfloat16>(a.partial, S, MN, N, a.bias, a.bias_kind, a.out, stream); break;
      default: break;
    }
  }
}

}  // namespace cuda
}  // namespace mbwq
