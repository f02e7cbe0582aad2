// mbwq::decode_mismatches: the tensor-core decoders checked against their plain reference
// (decode_pairs_reference: each code read by its bit position) on the device, for tests: the
// exact decode (mma_decode.cuh: decode_pairs, all bit tricks) pair for pair, and the fold
// decode (mma_fold.cuh: SubnormalCodes), whose pair i must be the fp16 subnormals
// c * 2^(E - 24), bit pattern c << E, E = pair_offset(B, i). Every thread takes one (lo, hi)
// word pair and decodes it for every width and every lane position t; the result counts the
// fp16 pairs that differ bitwise (0 when all agree).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mma_decode.cuh"
#include "mma_fold.cuh"

namespace mbwq {
namespace cuda {
namespace {

__device__ __forceinline__ uint32_t as_u32(__half2 v) { return *reinterpret_cast<uint32_t*>(&v); }

template <int B>
__device__ __forceinline__ int mismatches(uint32_t lo, uint32_t hi) {
  int n = 0;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const CodePairs fast = decode_pairs<B>(lo, hi, t);
    const CodePairs fold = decode_pairs<B, SubnormalCodes>(lo, hi, t);
    const CodePairs slow = decode_pairs_reference<B>(lo, hi, t);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      n += as_u32(fast.p[i]) != as_u32(slow.p[i]) ? 1 : 0;
      const uint32_t c0 = __half2uint_rz(__low2half(slow.p[i]));
      const uint32_t c1 = __half2uint_rz(__high2half(slow.p[i]));
      const int E = pair_offset(B, i);
      n += as_u32(fold.p[i]) != ((c0 << E) | (c1 << (16 + E))) ? 1 : 0;
    }
  }
  return n;
}

__global__ void decode_check_kernel(const int32_t* __restrict__ words, int64_t pairs,
                                    unsigned long long* __restrict__ count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const uint32_t lo = uint32_t(words[2 * i]), hi = uint32_t(words[2 * i + 1]);
  const int n = mismatches<2>(lo, hi) + mismatches<3>(lo, hi) + mismatches<4>(lo, hi) +
                mismatches<5>(lo, hi) + mismatches<6>(lo, hi) + mismatches<8>(lo, hi);
  if (n) atomicAdd(count, static_cast<unsigned long long>(n));
}

at::Tensor decode_mismatches_cuda(const at::Tensor& words_) {
  TORCH_CHECK_VALUE(words_.scalar_type() == at::kInt && words_.dim() == 2 && words_.size(1) == 2,
                    "mbwq.decode_mismatches: words must be int32 [n, 2], got ",
                    words_.scalar_type(), " ", words_.sizes());
  const c10::cuda::CUDAGuard guard(words_.device());
  const at::Tensor words = words_.contiguous();
  at::Tensor count = at::zeros({}, words.options().dtype(at::kLong));
  const int64_t pairs = words.size(0);
  if (pairs > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    decode_check_kernel<<<unsigned((pairs + 255) / 256), 256, 0, stream>>>(
        words.data_ptr<int32_t>(), pairs,
        reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return count;
}

}  // namespace
}  // namespace cuda
}  // namespace mbwq

TORCH_LIBRARY_IMPL(mbwq, CUDA, m) { m.impl("decode_mismatches", &mbwq::cuda::decode_mismatches_cuda); }
