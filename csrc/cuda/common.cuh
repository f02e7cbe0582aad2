// Small device helpers shared by the CUDA kernels: 16-bit float conversions and the
// argument-dtype tags the host passes for optional tensors.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "../format.h"

namespace mbwq {
namespace cuda {

// dtype of an optional channel_scale / bias as the kernels see it. The host converts any other
// floating dtype to float32 first (at::Tensor::to), which is what the CPU kernel does too.
enum AuxKind : int { kAuxNone = 0, kAuxHalf = 1, kAuxBF16 = 2, kAuxFloat = 3 };

__device__ __forceinline__ float aux_load(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kAuxHalf: return __half2float(static_cast<const __half*>(p)[i]);
    case kAuxBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Activation / output element types: __half, __nv_bfloat16 or float.
template <typename T> struct Cvt;
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half from_h(__half v) { return v; }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  // fp16 -> bf16 goes through float (exact), then one rounding to bf16
  static __device__ __forceinline__ __nv_bfloat16 from_h(__half v) {
    return __float2bfloat16_rn(__half2float(v));
  }
};
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
  static __device__ __forceinline__ float from_h(__half v) { return __half2float(v); }
};

// Round a float to T and back: the value a T tensor would hold.
template <typename T>
__device__ __forceinline__ float round_as(float v) {
  return Cvt<T>::to_f(Cvt<T>::from_f(v));
}

__device__ __forceinline__ float qnan() { return __int_as_float(0x7fc00000); }

// 16 bytes of global memory through L2 only (ld.global.cg), for data an earlier kernel in the
// stream writes (x as the previous layer left it, read by the gather): a chained kernel
// (pdl.cuh) starts before that kernel ends, and the read-only path (ld.global.nc, __ldg) is
// only defined for data that stays unchanged for the reading kernel's whole lifetime. Weights
// are never written by a kernel of the chain and keep the read-only path.
__device__ __forceinline__ uint4 load16_l2(const void* p) {
  return __ldcg(static_cast<const uint4*>(p));
}

// A block-table entry as the kernels use it: format.h's BlockEntry, validated. bits == 0
// marks an entry that is out of range; kernels turn its outputs into NaN instead of reading
// outside qweight / scales.
using BlockMeta = BlockEntry;

// b as read from the table, or {0, 0, 0} where it points outside qweight (R rows) / scales
// (G groups) or has no valid width (format.h: valid_bits).
__device__ __forceinline__ BlockMeta check_block(BlockMeta b, int R, int G) {
  const bool ok = valid_bits(b.bits) && b.word >= 0 && b.word <= R - b.bits && b.group >= 0 &&
                  b.group < G;
  return ok ? b : BlockMeta{0, 0, 0};
}

__device__ __forceinline__ BlockMeta load_block(const int* blocks, int j, int R, int G) {
  return check_block(block_entry(blocks, j), R, G);
}

}  // namespace cuda
}  // namespace mbwq
