// Dequantization (mbwq::dequant, and the weight half of the large-M gemm path), and the
// conversion of optional channel_scale / bias tensors every launcher uses (aux_tensor).
//
// Dequant: one thread = one 32-row block x CW adjacent columns (CW = 4 when N % 4 == 0, so
// that a warp reads 512 contiguous bytes of each qweight row and writes whole rows of W).
//
//     grid.y = block j (32 stored rows)      grid.x * 128 threads * CW = columns
//     thread: load the block's `bits` words of its CW columns, then for r = 0..31
//             W[perm[32j + r], n0 .. n0+CW) = T(fp16(code * scale - zero))
//
// Rows are scattered to perm[k] (a warp still writes one contiguous row segment per r), so
// the output comes out in original input order with no second pass. Each fp16 value is the
// single rounding of code*scale - zero (__hfma), bit-exact with the original; bf16 / fp32
// outputs convert that fp16 value.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "../format.h"
#include "common.cuh"
#include "decode.cuh"
#include "launch.h"

namespace mbwq {
namespace cuda {
namespace {

constexpr int kDequantThreads = 128;

template <typename T, int CW>
__device__ __forceinline__ void store_row(T* dst, const T (&v)[CW]) {
  if constexpr (CW == 4 && sizeof(T) == 2) {
    uint2 u;
    u.x = static_cast<uint32_t>(reinterpret_cast<const uint16_t&>(v[0])) |
          (static_cast<uint32_t>(reinterpret_cast<const uint16_t&>(v[1])) << 16);
    u.y = static_cast<uint32_t>(reinterpret_cast<const uint16_t&>(v[2])) |
          (static_cast<uint32_t>(reinterpret_cast<const uint16_t&>(v[3])) << 16);
    *reinterpret_cast<uint2*>(dst) = u;
  } else if constexpr (CW == 4) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int c = 0; c < CW; ++c) dst[c] = v[c];
  }
}

template <int BITS, int CW, typename T>
__device__ __forceinline__ void dequant_block(const uint32_t* __restrict__ qw, int N, int n0,
                                              int word, int group, const __half* scales,
                                              const __half* zeros, const int* perm, int k0,
                                              int K, T* __restrict__ out) {
  uint32_t w[CW][BITS];
  __half s[CW], nz[CW];
  if constexpr (CW == 4) {
#pragma unroll
    for (int i = 0; i < BITS; ++i) {
      const uint4 v =
          __ldg(reinterpret_cast<const uint4*>(qw + static_cast<int64_t>(word + i) * N + n0));
      w[0][i] = v.x, w[1][i] = v.y, w[2][i] = v.z, w[3][i] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i)
#pragma unroll
      for (int c = 0; c < CW; ++c) w[c][i] = __ldg(qw + static_cast<int64_t>(word + i) * N + n0 + c);
  }
#pragma unroll
  for (int c = 0; c < CW; ++c) {
    s[c] = scales[static_cast<int64_t>(group) * N + n0 + c];
    nz[c] = __hneg(zeros[static_cast<int64_t>(group) * N + n0 + c]);
  }
#pragma unroll
  for (int r = 0; r < 32; ++r) {
    const int k = k0 + r;
    const int p = perm ? __ldg(perm + k) : k;
    if (static_cast<unsigned>(p) >= static_cast<unsigned>(K)) continue;  // bad perm: skip row
    T v[CW];
#pragma unroll
    for (int c = 0; c < CW; ++c) v[c] = Cvt<T>::from_h(dequant_h(code_u32<BITS>(w[c], r), s[c], nz[c]));
    store_row<T, CW>(out + static_cast<int64_t>(p) * N + n0, v);
  }
}

template <int CW, typename T>
__global__ void __launch_bounds__(kDequantThreads) dequant_kernel(
    const uint32_t* __restrict__ qw, const __half* __restrict__ scales,
    const __half* __restrict__ zeros, const int* __restrict__ blocks,
    const int* __restrict__ perm, int R, int G, int N, int K, T* __restrict__ out) {
  const int n0 = (blockIdx.x * kDequantThreads + threadIdx.x) * CW;
  if (n0 >= N) return;
  const int j = blockIdx.y;
  const BlockMeta b = load_block(blocks, j, R, G);
  const int k0 = j * 32;
  switch (b.bits) {
    case 2: dequant_block<2, CW, T>(qw, N, n0, b.word, b.group, scales, zeros, perm, k0, K, out); break;
    case 3: dequant_block<3, CW, T>(qw, N, n0, b.word, b.group, scales, zeros, perm, k0, K, out); break;
    case 4: dequant_block<4, CW, T>(qw, N, n0, b.word, b.group, scales, zeros, perm, k0, K, out); break;
    case 5: dequant_block<5, CW, T>(qw, N, n0, b.word, b.group, scales, zeros, perm, k0, K, out); break;
    case 6: dequant_block<6, CW, T>(qw, N, n0, b.word, b.group, scales, zeros, perm, k0, K, out); break;
    case 8: dequant_block<8, CW, T>(qw, N, n0, b.word, b.group, scales, zeros, perm, k0, K, out); break;
    default: {  // invalid table entry: NaN rows instead of reading out of bounds
      T v[CW];
#pragma unroll
      for (int c = 0; c < CW; ++c) v[c] = Cvt<T>::from_f(qnan());
      for (int r = 0; r < 32; ++r) {
        const int p = perm ? __ldg(perm + k0 + r) : k0 + r;
        if (static_cast<unsigned>(p) < static_cast<unsigned>(K))
          store_row<T, CW>(out + static_cast<int64_t>(p) * N + n0, v);
      }
    }
  }
}

template <int CW, typename T>
void launch_dequant(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                    const at::Tensor& blocks, const int* perm, at::Tensor& out,
                    cudaStream_t stream) {
  const int N = static_cast<int>(qweight.size(1));
  const int nblocks = static_cast<int>(blocks.size(0));
  const int K = nblocks * 32;
  const int threads_x = (N + CW - 1) / CW;
  const dim3 grid((threads_x + kDequantThreads - 1) / kDequantThreads, nblocks);
  dequant_kernel<CW, T><<<grid, kDequantThreads, 0, stream>>>(
      reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>()),
      reinterpret_cast<const __half*>(scales.data_ptr()),
      reinterpret_cast<const __half*>(zeros.data_ptr()), blocks.data_ptr<int32_t>(), perm,
      static_cast<int>(qweight.size(0)), static_cast<int>(scales.size(0)), N, K,
      reinterpret_cast<T*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dequant_t(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
               const at::Tensor& blocks, const int* perm, at::Tensor& out, cudaStream_t stream) {
  const int64_t N = qweight.size(1);
  const bool vec = N % 4 == 0 && reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out.data_ptr()) % (4 * sizeof(T)) == 0;
  if (vec)
    launch_dequant<4, T>(qweight, scales, zeros, blocks, perm, out, stream);
  else
    launch_dequant<1, T>(qweight, scales, zeros, blocks, perm, out, stream);
}

}  // namespace

void dequant(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
             const at::Tensor& blocks, const at::Tensor& perm, at::Tensor& out) {
  if (out.numel() == 0) return;
  const int* p = perm.numel() > 0 ? perm.data_ptr<int32_t>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (out.scalar_type()) {
    case at::kHalf: dequant_t<__half>(qweight, scales, zeros, blocks, p, out, stream); break;
    case at::kBFloat16: dequant_t<__nv_bfloat16>(qweight, scales, zeros, blocks, p, out, stream); break;
    case at::kFloat: dequant_t<float>(qweight, scales, zeros, blocks, p, out, stream); break;
    default: TORCH_CHECK(false, "mbwq: internal: dequant kernel has no ", out.scalar_type(), " output");
  }
}

// ---- channel_scale / bias as the kernels read them (launch.h) ----

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

}  // namespace cuda
}  // namespace mbwq
