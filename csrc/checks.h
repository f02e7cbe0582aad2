// Argument checks shared by the CPU and CUDA wrappers. Each one is mirrored by a torch._check
// in mbwq_ops/ops.py (the fake kernels), so a bad call fails the same way under torch.compile.
// These look only at shapes, dtypes and devices: never at tensor values (no host sync).
#pragma once
#include <ATen/ATen.h>
#include "format.h"

namespace mbwq {

inline void check_weight_args(const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros, const at::Tensor& blocks,
                              const at::Tensor& perm) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt,
              "mbwq: qweight must be a 2-D int32 tensor, got ", qweight.dim(), "-D ",
              qweight.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kHalf,
              "mbwq: scales must be a 2-D float16 tensor, got ", scales.dim(), "-D ",
              scales.scalar_type());
  TORCH_CHECK(zeros.sizes() == scales.sizes() && zeros.scalar_type() == at::kHalf,
              "mbwq: zeros must be float16 with the shape of scales ", scales.sizes(), ", got ",
              zeros.scalar_type(), " ", zeros.sizes());
  TORCH_CHECK(scales.size(1) == qweight.size(1),
              "mbwq: scales has ", scales.size(1), " columns but qweight has ", qweight.size(1));
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == kBlockCols &&
                  blocks.scalar_type() == at::kInt,
              "mbwq: blocks must be int32 [K/32, ", kBlockCols, "], got ", blocks.scalar_type(),
              " ", blocks.sizes());
  const int64_t K = blocks.size(0) * kBlockRows;
  TORCH_CHECK(perm.dim() == 1 && perm.scalar_type() == at::kInt,
              "mbwq: perm must be a 1-D int32 tensor, got ", perm.dim(), "-D ",
              perm.scalar_type());
  // K comes from blocks, so a short blocks table shows up here: name both sides.
  TORCH_CHECK(perm.numel() == 0 || perm.numel() == K, "mbwq: perm has ", perm.numel(),
              " entries but blocks covers K = ", K, " input features (", blocks.size(0),
              " blocks of ", kBlockRows, " rows); perm must be [K] or [0] (identity)");
  for (const at::Tensor* t : {&scales, &zeros, &blocks, &perm}) {
    TORCH_CHECK(t->device() == qweight.device(), "mbwq: all weight tensors must be on ",
                qweight.device(), ", found one on ", t->device());
  }
}

// dequant's output dtype: floating (fp16, bf16 and fp32 are written directly, others are the
// fp16 weight converted); an integer W would truncate every weight.
inline void check_dequant_dtype(at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(dtype), "mbwq: dequant dtype must be a floating type, got ",
              dtype);
}

inline void check_gemm_args(const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& blocks,
                            const std::optional<at::Tensor>& channel_scale,
                            const std::optional<at::Tensor>& bias) {
  const int64_t K = blocks.size(0) * kBlockRows;
  const int64_t N = qweight.size(1);
  TORCH_CHECK(x.dim() == 2, "mbwq: x must be 2-D [M, K], got ", x.dim(), "-D ", x.sizes());
  TORCH_CHECK(x.size(1) == K, "mbwq: x has ", x.size(1), " features but the layer has ", K);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "mbwq: x must be float16, bfloat16 or float32, got ", dt);
  TORCH_CHECK(x.device() == qweight.device(), "mbwq: x is on ", x.device(),
              " but the weights are on ", qweight.device());
  if (channel_scale.has_value()) {
    const auto& cs = *channel_scale;
    TORCH_CHECK(cs.dim() == 1 && cs.numel() == K && at::isFloatingType(cs.scalar_type()),
                "mbwq: channel_scale must be a floating [", K, "] tensor, got ",
                cs.scalar_type(), " ", cs.sizes());
    TORCH_CHECK(cs.device() == x.device(), "mbwq: channel_scale is on ", cs.device(),
                " but x is on ", x.device());
  }
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.numel() == N && at::isFloatingType(b.scalar_type()),
                "mbwq: bias must be a floating [", N, "] tensor, got ", b.scalar_type(), " ",
                b.sizes());
    TORCH_CHECK(b.device() == x.device(), "mbwq: bias is on ", b.device(), " but x is on ",
                x.device());
  }
}

}  // namespace mbwq
