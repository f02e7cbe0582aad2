// Host-side entry points of the CUDA kernels (defined in gemm_mma.cu and dequant.cu, called by
// ops_cuda.cu). Every launcher runs on the current stream of the current device; the caller
// holds the device guard and has checked shapes (checks.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace mbwq {
namespace cuda {

// Path boundaries, from shapes only (ops_cuda.cpp: gemm_cuda): the tensor-core kernel takes
// 1 <= M <= kMmaChunkedMaxM (fp16 / bf16, mma_supported), dequant + cuBLAS everything else.
// Measured on an H100 (BENCHMARKS.md): the tensor-core kernel beats the former CUDA-core
// kernel from M = 1 on.
//
// Largest M of one tensor-core kernel call (gemm_mma.cu), and largest M that takes the
// tensor-core path as row chunks of kMmaMaxM, each reading the weights once (H100, 8192 x 28672
// 4-bit: M = 128 in two chunks 238 us against 394 us for dequant + cuBLAS; M = 256 in four 477
// us against 423 us).
constexpr int64_t kMmaMaxM = 64;
constexpr int64_t kMmaChunkedMaxM = 192;

// True when the tensor-core kernel may take this layer: fp16 / bf16 activations, K and N
// multiples of 8 (16-byte copies of qweight rows, scales and zeros) and 16-byte aligned data.
bool mma_supported(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const at::Tensor& zeros);

// y[M, N] = round(x * cs)[:, perm] @ Wstored + bias on tensor cores (mma.sync), weights read
// once per call, for 1 <= M <= kMmaMaxM.
void gemm_mma(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
              const at::Tensor& zeros, const at::Tensor& blocks, const at::Tensor& perm,
              const std::optional<at::Tensor>& cs, const std::optional<at::Tensor>& bias,
              at::Tensor& y);

// Multiprocessor count and compute-capability major of the current device (read once per
// device).
int sm_count();
int compute_capability_major();

// out[perm[k], n] (or out[k, n] when perm is empty) = fp16(code * scale - zero), as out's dtype.
void dequant(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
             const at::Tensor& blocks, const at::Tensor& perm, at::Tensor& out);

// xs[m, k] = round_x(x[m, perm[k]] * cs[perm[k]]) in x's dtype (stored row order).
void gather_scale(const at::Tensor& x, const at::Tensor& perm, const std::optional<at::Tensor>& cs,
                  at::Tensor& xs);

// The kernels read channel_scale / bias as float16, bfloat16 or float32; anything else is
// converted to float32 first (what the CPU kernel computes with).
at::Tensor aux_tensor(const at::Tensor& t);
int aux_kind(const std::optional<at::Tensor>& t);

}  // namespace cuda
}  // namespace mbwq
