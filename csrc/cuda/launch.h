// Host-side entry points of the CUDA kernels (defined in gemv.cu and dequant.cu, called by
// ops_cuda.cu). Every launcher runs on the current stream of the current device; the caller
// holds the device guard and has checked shapes (checks.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace mbwq {
namespace cuda {

// Path boundaries, from shapes only (ops_cuda.cpp: gemm_cuda). Measured on an H100 at
// 8192 x 28672 4-bit g128 (scripts/bench.py, median of CUDA-graph replays):
//   M          1     2     4     8     16    32    64    (us)
//   gemv       98    124   165   301   -     -     -
//   mma        171   173   174   174   192   232   488
//   dequant+cuBLAS  ~385 .. 420 for any M <= 256
// so the CUDA-core kernel takes M <= 4, the tensor-core kernel 5..32, cuBLAS the rest.
// (With three CTAs per SM the tensor-core kernel later measured 152 us at M = 8 and 163 us at
// M = 16; M = 2..4 was not re-measured, so the M <= 4 boundary may now sit too high.)
constexpr int64_t kGemvMaxM = 4;

// True when the small-M kernel may take this layer: it loads 4 adjacent columns of qweight as
// one 16-byte vector and 4 scales/zeros as 8 bytes, so N % 4 == 0 and aligned pointers.
// Activations must be fp16 or bf16.
// fp16 / bf16 activations only (fp32 is not a speed path and takes dequant + cuBLAS).
bool gemv_supported(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros);

// y[M, N] = round(x * cs)[:, perm] @ Wstored + bias, for 1 <= M (any M; used for M <= kGemvMaxM).
// cs / bias are float16, bfloat16 or float32 (or absent).
void gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
          const at::Tensor& zeros, const at::Tensor& blocks, const at::Tensor& perm,
          const std::optional<at::Tensor>& cs, const std::optional<at::Tensor>& bias,
          at::Tensor& y);

// Largest M of the tensor-core path (gemm_mma.cu).
constexpr int64_t kMmaMaxM = 32;

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

// Multiprocessor count of the current device (read once per device).
int sm_count();

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
