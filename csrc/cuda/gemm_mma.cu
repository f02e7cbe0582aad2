// Tensor-core GEMM for small and medium M (fp16 / bf16 activations), reading the stored
// qweight directly: y^T [N, M] = W^T [N, K] . xs^T [K, M] with mma.sync.m16n8k16.
//
// Roles: W^T is the A operand (16 output columns x 16 k), xs^T the B operand (16 k x 8 tokens),
// fp32 accumulators. Every packed weight byte is read from DRAM once per call, whatever M.
//
// ---------------------------------------------------------------------------------------
// Which codes a lane decodes. Lane = (g, q) with g = lane / 4 (0..7), q = lane % 4 (0..3).
// The mma fixes which (n, k) entries of A a lane holds: rows (= output columns) g and g+8,
// k-columns {2q, 2q+1, 2q+8, 2q+9}. The k order inside a k16 step is ours to choose, as long
// as the B operand (x) uses the same one. We give lane q the 8 consecutive stored rows
// 8q .. 8q+7 of each 32-row block, i.e. its bits [8q*b, 8q*b + 8b) of the column's bit
// string = bytes [q*b, q*b + b) of the block's b words: one lane never needs more than two
// adjacent words.
//
//   column strip of one block (b words, bit string little-endian):
//     | lane0: rows 0-7 | lane1: rows 8-15 | lane2: rows 16-23 | lane3: rows 24-31 |
//       bytes [0,b)       bytes [b,2b)       bytes [2b,3b)       bytes [3b,4b)
//
// With c0..c7 the lane's codes (rows 8q+0..8q+7), half2 pairs (c_i, c_i+4) feed the mma:
//     k-step 0: A regs {(c0,c4) col g, (c0,c4) col g+8, (c1,c5) col g, (c1,c5) col g+8}
//     k-step 1: A regs {(c2,c6) col g, (c2,c6) col g+8, (c3,c7) col g, (c3,c7) col g+8}
// so mma k-index 2q <-> row 8q+2s, 2q+1 <-> 8q+2s+4, 2q+8 <-> 8q+2s+1, 2q+9 <-> 8q+2s+5.
// x is stored in shared memory in the matching order, each 8-row chunk as
//     [x0 x4 | x1 x5 | x2 x6 | x3 x7]      (one 16-byte load gives both k-steps' B regs)
// For 4-bit codes (c_i, c_i+4) sit 16 bits apart in one word, so a pair is one shift and one
// mask-or; other widths spread their bits first.
//
// A pair of codes becomes a pair of fp16 weights without int->float conversions:
//     0x6400 | c  is the fp16 number 1024 + c  (c < 1024)  ->  subtract 1024 (exact)
//     w = fma(c, scale, -zero) in fp16: one rounding, the original's exact weight.
// For bf16 activations the fp16 weight is then converted to bf16.
// ---------------------------------------------------------------------------------------
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "../format.h"
#include "common.cuh"
#include "launch.h"

namespace mbwq {
namespace cuda {
namespace {

constexpr int kWarps = 8;                 // warps per CTA
constexpr int kColsPerWarp = 16;          // one m16 tile of output columns
constexpr int kCtaCols = kWarps * kColsPerWarp;
constexpr int kStages = 4;                // blocks of 32 rows in flight per warp (registers)
constexpr int kXPadBytes = 64;            // x row stride = 64 mod 128 bytes: conflict-free LDS.128

// Packed per-block metadata in shared memory: bits | group << 4 | word << 16 (0 = invalid).
__device__ __forceinline__ uint32_t pack_meta(int bits, int word, int group) {
  return uint32_t(bits) | (uint32_t(group) << 4) | (uint32_t(word) << 16);
}

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t from_fp16x2(__half2 w) {
    return *reinterpret_cast<uint32_t*>(&w);
  }
};

template <>
struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t from_fp16x2(__half2 w) {
    __nv_bfloat162 v = __float22bfloat162_rn(__half22float2(w));
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// One block's raw data for one lane, fetched kStages blocks ahead.
struct Stage {
  uint32_t meta;          // packed (bits, group, word); 0 = none / invalid
  uint32_t lo0, hi0;      // column g:   the lane's two words
  uint32_t lo1, hi1;      // column g+8
  uint32_t sz0, sz1;      // scale | zero << 16 (fp16 bits) of both columns
};

// Pair i (0..3) of a lane's string: codes c_i (low half) and c_{i+4} (high half) as the fp16
// bit patterns 0x6400 | c.
template <int B>
__device__ __forceinline__ uint32_t code_pair(uint64_t s, int i) {
  constexpr uint32_t kMask = (1u << B) - 1u;
  if constexpr (B == 4) {
    // c_i at bits 4i, c_{i+4} at 4i + 16: already 16 bits apart.
    return ((uint32_t(s) >> (4 * i)) & 0x000F000Fu) | 0x64006400u;
  } else if constexpr (B == 2) {
    // c0..c3 in byte 0, c4..c7 in byte 1: move byte 1 to byte 2, then as for 4-bit.
    const uint32_t t = __byte_perm(uint32_t(s), 0u, 0x4140);  // bytes [b0, 0, b1, 0]
    return ((t >> (2 * i)) & 0x00030003u) | 0x64006400u;
  } else if constexpr (B == 8) {
    // c_i is byte i of the low word, c_{i+4} byte i of the high word.
    const uint32_t t = __byte_perm(uint32_t(s), uint32_t(s >> 32), 0x0400 + i * 0x0101);
    return (t & 0x00FF00FFu) | 0x64006400u;
  } else {
    const uint32_t lo = uint32_t(s >> (B * i)) & kMask;
    const uint32_t hi = uint32_t(s >> (B * (i + 4))) & kMask;
    return lo | (hi << 16) | 0x64006400u;
  }
}

// Decode a lane's 8 codes of both its columns into the A registers of the block's two k-steps.
template <int B, typename T>
__device__ __forceinline__ void decode_block(const Stage& st, int q, uint32_t (&a)[2][4]) {
  // The lane's bytes [q*B, q*B + B) start (q*B) % 4 bytes into its first word.
  const int shift = 8 * ((q * B) & 3);  // constant 0 for B = 4, 8
  const uint64_t s0 = ((uint64_t(st.hi0) << 32) | st.lo0) >> shift;
  const uint64_t s1 = ((uint64_t(st.hi1) << 32) | st.lo1) >> shift;
  const uint32_t sz0 = st.sz0, sz1 = st.sz1;
  const __half2 k1024 = __half2half2(__ushort_as_half(0x6400));
  const __half2 sc0 = __half2half2(__ushort_as_half(uint16_t(sz0)));
  const __half2 nz0 = __hneg2(__half2half2(__ushort_as_half(uint16_t(sz0 >> 16))));
  const __half2 sc1 = __half2half2(__ushort_as_half(uint16_t(sz1)));
  const __half2 nz1 = __hneg2(__half2half2(__ushort_as_half(uint16_t(sz1 >> 16))));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t p0 = code_pair<B>(s0, i), p1 = code_pair<B>(s1, i);
    __half2 c0 = __hsub2(*reinterpret_cast<__half2*>(&p0), k1024);
    __half2 c1 = __hsub2(*reinterpret_cast<__half2*>(&p1), k1024);
    // step s = i / 2; within a step, even i -> regs 0/1, odd i -> regs 2/3
    a[i >> 1][(i & 1) * 2 + 0] = MmaOp<T>::from_fp16x2(__hfma2(c0, sc0, nz0));
    a[i >> 1][(i & 1) * 2 + 1] = MmaOp<T>::from_fp16x2(__hfma2(c1, sc1, nz1));
  }
}

__device__ __forceinline__ void fetch(Stage& st, uint32_t meta, int q, const uint32_t* qweight,
                                      const uint16_t* scales, const uint16_t* zeros, int N,
                                      int n0, bool ok0, bool ok1) {
  st.meta = meta;
  st.lo0 = st.hi0 = st.lo1 = st.hi1 = 0;
  st.sz0 = st.sz1 = 0;
  if (meta == 0) return;
  const int bits = meta & 15, group = (meta >> 4) & 4095, word = meta >> 16;
  const int byte0 = q * bits;
  const int64_t row_lo = word + (byte0 >> 2);
  const bool need_hi = (byte0 & 3) + bits > 4;  // never past the block: see the header
  const uint32_t* p = qweight + row_lo * N + n0;
  if (ok0) {
    st.lo0 = __ldg(p);
    if (need_hi) st.hi0 = __ldg(p + N);
    st.sz0 = uint32_t(__ldg(scales + int64_t(group) * N + n0)) |
             (uint32_t(__ldg(zeros + int64_t(group) * N + n0)) << 16);
  }
  if (ok1) {
    st.lo1 = __ldg(p + 8);
    if (need_hi) st.hi1 = __ldg(p + N + 8);
    st.sz1 = uint32_t(__ldg(scales + int64_t(group) * N + n0 + 8)) |
             (uint32_t(__ldg(zeros + int64_t(group) * N + n0 + 8)) << 16);
  }
}

// grid: (ceil(N / kCtaCols), splits); block: kWarps * 32 threads.
// xs: gathered, scaled, interleaved activations [MT * 8, K] (rows >= M are zero).
// out: splits == 1 -> y [M, N] (T) with bias; else fp32 partials [splits, M, N].
// Three CTAs per SM for one or two token tiles (<= 80 registers, no spills; measured on an
// H100 at 8192 x 28672 4-bit: M = 16 193 -> 166 us), two for four tiles (80 would spill).
template <typename T, int MT>
__global__ void __launch_bounds__(kWarps * 32, MT <= 2 ? 3 : 2)
    mma_gemm_kernel(const T* __restrict__ xs, const uint32_t* __restrict__ qweight,
                    const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
                    const int32_t* __restrict__ blocks, const void* __restrict__ bias,
                    int bias_kind, void* __restrict__ out, int M, int K, int N, int R, int G,
                    int blocks_per_split, int chunk_blocks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int nblocks = K / kBlockRows;
  const int jb0 = blockIdx.y * blocks_per_split;
  const int jb1 = min(nblocks, jb0 + blocks_per_split);
  const int my_blocks = max(0, jb1 - jb0);
  const int x_stride = chunk_blocks * kBlockRows * 2 + kXPadBytes;  // bytes per token row
  uint32_t* meta_s = reinterpret_cast<uint32_t*>(smem);
  unsigned char* x_s = smem + ((blocks_per_split * 4 + 15) / 16) * 16;

  // Block table of this split -> shared memory, validated (a bad entry poisons the output
  // instead of steering loads out of bounds).
  for (int j = threadIdx.x; j < my_blocks; j += blockDim.x) {
    const BlockMeta b = load_block(blocks, jb0 + j, R, G);  // bits == 0 when out of range
    meta_s[j] = b.bits ? pack_meta(b.bits, b.word, b.group) : 0u;
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  const int n0 = blockIdx.x * kCtaCols + warp * kColsPerWarp + g;
  const bool ok0 = n0 < N, ok1 = n0 + 8 < N;
  bool poisoned = false;
  float acc[MT][4];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

  __syncthreads();
  Stage ring[kStages];
#pragma unroll
  for (int d = 0; d < kStages; ++d)
    fetch(ring[d], d < my_blocks ? meta_s[d] : 0u, q, qweight, scales, zeros, N, n0, ok0, ok1);

  for (int c0 = 0; c0 < my_blocks; c0 += chunk_blocks) {
    const int cn = min(chunk_blocks, my_blocks - c0);
    // x rows of this chunk -> shared memory (16-byte copies; already interleaved)
    __syncthreads();
    const int vec_per_row = cn * kBlockRows / 8;
    for (int v = threadIdx.x; v < MT * 8 * vec_per_row; v += blockDim.x) {
      const int m = v / vec_per_row, c = v % vec_per_row;
      const int4 val = __ldg(reinterpret_cast<const int4*>(
          xs + int64_t(m) * K + int64_t(jb0 + c0) * kBlockRows + c * 8));
      *reinterpret_cast<int4*>(x_s + m * x_stride + c * 16) = val;
    }
    __syncthreads();
    for (int jl = 0; jl < cn; jl += kStages) {
#pragma unroll
      for (int d = 0; d < kStages; ++d) {
        const int j = c0 + jl + d;  // block (relative to the split) held by ring[d]
        if (jl + d < cn) {
          Stage st = ring[d];
          const int nxt = j + kStages;
          fetch(ring[d], nxt < my_blocks ? meta_s[nxt] : 0u, q, qweight, scales, zeros, N, n0,
                ok0, ok1);
          uint32_t a[2][4];
          switch (st.meta & 15) {
            case 2: decode_block<2, T>(st, q, a); break;
            case 3: decode_block<3, T>(st, q, a); break;
            case 4: decode_block<4, T>(st, q, a); break;
            case 5: decode_block<5, T>(st, q, a); break;
            case 6: decode_block<6, T>(st, q, a); break;
            case 8: decode_block<8, T>(st, q, a); break;
            default: poisoned = true; continue;
          }
#pragma unroll
          for (int t = 0; t < MT; ++t) {
            const int4 xb = *reinterpret_cast<const int4*>(
                x_s + (t * 8 + g) * x_stride + ((j - c0) * kBlockRows + 8 * q) * 2);
            MmaOp<T>::run(acc[t], a[0], uint32_t(xb.x), uint32_t(xb.y));
            MmaOp<T>::run(acc[t], a[1], uint32_t(xb.z), uint32_t(xb.w));
          }
        }
      }
    }
  }

  // Accumulator (16 columns x 8 tokens per tile): c0,c1 -> column g, tokens 2q, 2q+1;
  // c2,c3 -> column g+8, same tokens.
  const float nan = qnan();
#pragma unroll
  for (int t = 0; t < MT; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = t * 8 + 2 * q + (e & 1);
      const int n = n0 + (e >> 1) * 8;
      if (m >= M || n >= N) continue;
      float v = poisoned ? nan : acc[t][e];
      if (gridDim.y == 1) {
        if (bias_kind != kAuxNone) v += aux_load(bias, bias_kind, n);
        reinterpret_cast<T*>(out)[int64_t(m) * N + n] = Cvt<T>::from_f(v);
      } else {
        reinterpret_cast<float*>(out)[(int64_t(blockIdx.y) * M + m) * N + n] = v;
      }
    }
  }
}

// Sum the split partials in a fixed order (deterministic), add bias, round once.
template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ part, const void* __restrict__ bias,
                                     int bias_kind, T* __restrict__ y, int splits, int64_t MN,
                                     int N) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= MN) return;
  float v = 0.f;
  for (int s = 0; s < splits; ++s) v += part[s * MN + i];
  if (bias_kind != kAuxNone) v += aux_load(bias, bias_kind, i % N);
  y[i] = Cvt<T>::from_f(v);
}

// xs[m, k'] = round_T(x[m, perm[k]] * channel_scale[perm[k]]) with k' the interleaved position
// of stored row k (see header), rows m >= M zero. An out-of-range perm entry gives NaN.
template <typename T>
__global__ void gather_x_kernel(const T* __restrict__ x, const int32_t* __restrict__ perm,
                                const void* __restrict__ cs, int cs_kind, T* __restrict__ xs,
                                int M, int M_pad, int K, bool has_perm) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // one 8-row chunk
  const int chunks = K / 8;
  if (i >= int64_t(M_pad) * chunks) return;
  const int m = int(i / chunks), c = int(i % chunks);
  T v[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    const int k = c * 8 + r;
    float f = 0.f;
    if (m < M) {
      const int src = has_perm ? perm[k] : k;
      if (src < 0 || src >= K) {
        f = qnan();
      } else {
        f = Cvt<T>::to_f(x[int64_t(m) * K + src]);
        if (cs_kind != kAuxNone) f = round_as<T>(f * aux_load(cs, cs_kind, src));
      }
    }
    v[r] = Cvt<T>::from_f(f);
  }
  // chunk order [0 4 1 5 2 6 3 7]
  alignas(16) T o[8] = {v[0], v[4], v[1], v[5], v[2], v[6], v[3], v[7]};
  *reinterpret_cast<int4*>(xs + int64_t(m) * K + c * 8) = *reinterpret_cast<int4*>(o);
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
            const at::Tensor& zeros, const at::Tensor& blocks, const at::Tensor& perm,
            const std::optional<at::Tensor>& channel_scale, const std::optional<at::Tensor>& bias,
            at::Tensor& y) {
  const int M = x.size(0), K = x.size(1), N = qweight.size(1);
  const int R = qweight.size(0), G = scales.size(0);
  const int MT = (M + 7) / 8;
  const int MT_pad = MT <= 1 ? 1 : MT <= 2 ? 2 : 4;
  const int M_pad = MT_pad * 8;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor xs = at::empty({M_pad, K}, x.options());
  const at::Tensor cs_t = channel_scale.has_value() ? aux_tensor(*channel_scale) : at::Tensor();
  {
    const int64_t n = int64_t(M_pad) * (K / 8);
    gather_x_kernel<T><<<(n + 255) / 256, 256, 0, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), perm.numel() ? perm.data_ptr<int32_t>() : nullptr,
        cs_t.defined() ? cs_t.data_ptr() : nullptr, cs_t.defined() ? aux_kind(cs_t) : kAuxNone,
        reinterpret_cast<T*>(xs.data_ptr()), M, M_pad, K, perm.numel() > 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int nblocks = K / kBlockRows;
  const int col_ctas = (N + kCtaCols - 1) / kCtaCols;
  const int sms = sm_count();
  // Enough CTAs for ~4 per SM, each split keeping at least 8 blocks of 32 rows.
  int splits = std::max(1, std::min((4 * sms + col_ctas - 1) / col_ctas, nblocks / 8));
  const int bps = (nblocks + splits - 1) / splits;
  splits = (nblocks + bps - 1) / bps;
  const int chunk_blocks = std::min(bps, std::max(kStages, 64 / MT_pad));
  const size_t smem = ((bps * 4 + 15) / 16) * 16 +
                      size_t(M_pad) * (chunk_blocks * kBlockRows * 2 + kXPadBytes);
  const at::Tensor bias_t = bias.has_value() ? aux_tensor(*bias) : at::Tensor();
  const void* bias_p = bias_t.defined() ? bias_t.data_ptr() : nullptr;
  const int bias_kind = bias_t.defined() ? aux_kind(bias_t) : kAuxNone;
  at::Tensor part;
  void* out = y.data_ptr();
  if (splits > 1) {
    part = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
    out = part.data_ptr();
  }
  dim3 grid(col_ctas, splits);
  auto run = [&](auto kernel) {
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          int(smem)));
    }
    kernel<<<grid, kWarps * 32, smem, stream>>>(
        reinterpret_cast<const T*>(xs.data_ptr()),
        reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>()),
        reinterpret_cast<const uint16_t*>(scales.data_ptr()),
        reinterpret_cast<const uint16_t*>(zeros.data_ptr()), blocks.data_ptr<int32_t>(), bias_p,
        bias_kind, out, M, K, N, R, G, bps, chunk_blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (MT_pad) {
    case 1: run(mma_gemm_kernel<T, 1>); break;
    case 2: run(mma_gemm_kernel<T, 2>); break;
    default: run(mma_gemm_kernel<T, 4>); break;
  }
  if (splits > 1) {
    const int64_t MN = int64_t(M) * N;
    reduce_splits_kernel<T><<<(MN + 255) / 256, 256, 0, stream>>>(
        part.data_ptr<float>(), bias_p, bias_kind, reinterpret_cast<T*>(y.data_ptr()), splits, MN,
        N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void gemm_mma(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const at::Tensor& zeros, const at::Tensor& blocks, const at::Tensor& perm,
                   const std::optional<at::Tensor>& channel_scale,
                   const std::optional<at::Tensor>& bias, at::Tensor& y) {
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMmaMaxM, "mbwq: tensor-core path needs 1 <= M <= ",
              kMmaMaxM, ", got M = ", x.size(0));
  if (x.scalar_type() == at::kHalf) {
    launch<__half>(x, qweight, scales, zeros, blocks, perm, channel_scale, bias, y);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "mbwq: tensor-core path takes fp16 or bf16");
    launch<__nv_bfloat16>(x, qweight, scales, zeros, blocks, perm, channel_scale, bias, y);
  }
}

}  // namespace cuda
}  // namespace mbwq
