// x brought into the order the weights are stored in, once per gemm call:
//
//     xs[m, k'] = round_T(x[m, perm[k]] * channel_scale[perm[k]])     (NaN if perm[k] is out of
//                                                                      range)
// where k' is the position the consumer expects stored row k at (XOrder, launch.h): plain
// (k' = k, for cuBLAS) or the interleaved chunk orders of the tensor-core kernels.
//
// Two kernels, one result:
//  * direct: one thread per 16-byte output chunk, each element read from global memory at its
//    permuted position. Many CTAs share every row, so a row is read by many SMs in 2-byte
//    pieces of 32-byte sectors: ~16x the row's bytes of L2 traffic, which is nothing for a few
//    tokens and the most parallel start for one.
//  * staged: a CTA reads its share of perm once, as 16-bit sources in shared memory, then for
//    each of its rows copies the whole row (scaled) into shared memory with coalesced 16-byte
//    loads and writes its chunks from there. A row's bytes cross L2 once per CTA, perm once
//    per CTA instead of once per row. Taken where plan.h's gather_staged says (from
//    kGatherStagedMinM rows); below that rows are few, and the direct gather spreads each over
//    many CTAs.
//
//    Rows alternate between two buffers, so that one barrier per row suffices and a thread
//    loads the next row while others still write from the last.
//
//    shared memory of a staged CTA:  | row buffer 0 | row buffer 1 | sources (share x 8 x u16) |
//                                      (K elements of T each)
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../format.h"
#include "common.cuh"
#include "launch.h"
#include "pdl.cuh"

namespace mbwq {
namespace cuda {
namespace {

constexpr int kGatherThreads = 256;
constexpr int kStagedThreads = 256;
// Largest staged row (plan.h): fp16 rows up to K = 49152, fp32 up to 24576; on devices whose
// CTAs cannot hold two such rows (below Hopper) rows that do not fit take the direct gather.
constexpr int kStagedMaxBytes = int(kGatherStagedMaxBytes);

// The raw activations and how to bring them into stored row order.
template <typename T>
struct XArgs {
  const T* x;           // [M, K]
  const int32_t* perm;  // stored row -> input feature, or nullptr (identity)
  const void* cs;       // channel_scale or nullptr
  int cs_kind;
};

// Stored row of element i of 16-byte chunk c. Within 32-row block b = c / 4, chunk c % 4 holds
// (mma_decode.cuh, wgmma.cuh):
//   plain:           rows 8c .. 8c + 7
//   mma.sync order:  rows 8c .. 8c + 7 as [0 4 1 5 2 6 3 7] (one load = both k-steps' B regs)
//   tile order:      rows 32b + p + 4i, i = 0..7, p = c % 4 (one piece of wgmma's B operand)
template <XOrder O>
__device__ __forceinline__ int chunk_row(int c, int i) {
  if constexpr (O == XOrder::kTile) return 32 * (c / 4) + c % 4 + 4 * i;
  if constexpr (O == XOrder::kMma) return 8 * c + i / 2 + 4 * (i % 2);
  return 8 * c + i;
}

// Element offset in xs of chunk c of row m. Every order but the tile order keeps rows apart
// (row m at m * K); the tile order keeps each H-token x 32-row block together (H = 1 << shift,
// the tile's tokens), in the layout of gemm_tile's shared-memory slot (piece p = c % 4 of token
// n at (p * H + n) * 16 bytes):
//   xs = | tile 0: block 0 (H x 64 bytes) | block 1 | ... | tile 1: block 0 | ...
template <XOrder O>
__device__ __forceinline__ int64_t chunk_dst(int m, int c, int K, int shift) {
  if constexpr (O == XOrder::kTile) {
    const int64_t tile_block = int64_t(m >> shift) * (K / 32) + c / 4;
    return (((tile_block * 4 + c % 4) << shift) + (m & ((1 << shift) - 1))) * 8;
  }
  return int64_t(m) * K + 8 * c;
}

// round_T(v * cs), the value the scaled x holds (v itself when there is no scale).
template <typename T>
__device__ __forceinline__ T scaled(const XArgs<T>& a, T v, float cs) {
  return a.cs_kind == kAuxNone ? v : Cvt<T>::from_f(Cvt<T>::to_f(v) * cs);
}

// channel_scale[j[e]] as float (1 without a scale); one switch for all eight loads, so that
// they are issued together.
template <int KIND>
__device__ __forceinline__ void load_scales8_as(const void* p, const int (&j)[8], float (&cs)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) cs[e] = aux_load(p, KIND, j[e]);  // KIND folds aux_load's switch
}
template <typename T>
__device__ __forceinline__ void load_scales8(const XArgs<T>& a, const int (&j)[8], float (&cs)[8]) {
  switch (a.cs_kind) {
    case kAuxHalf: load_scales8_as<kAuxHalf>(a.cs, j, cs); break;
    case kAuxBF16: load_scales8_as<kAuxBF16>(a.cs, j, cs); break;
    case kAuxFloat: load_scales8_as<kAuxFloat>(a.cs, j, cs); break;
    default:
#pragma unroll
      for (int e = 0; e < 8; ++e) cs[e] = 1.f;
  }
}

// The source of element e of chunk c: perm[k] (or k) for its stored row k in order O. Outside
// [0, K) marks a bad perm entry (NaN).
template <XOrder O, typename T>
__device__ __forceinline__ int chunk_source(const XArgs<T>& a, int c, int e) {
  const int k = chunk_row<O>(c, e);
  return a.perm != nullptr ? a.perm[k] : k;
}

// Eight elements of x at sources src[e] (NaN where src[e] is outside [0, K)), scaled. Loads in
// three rounds (perm entries before this, then x, then channel_scale) so that a thread waits
// for three memory latencies, not one chain per element.
template <typename T>
__device__ __forceinline__ void load8(const XArgs<T>& a, const T* row, const int (&src)[8], int K,
                                      T (&o)[8]) {
  bool ok[8];
  int j[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    ok[e] = unsigned(src[e]) < unsigned(K);
    j[e] = ok[e] ? src[e] : 0;
    o[e] = row[j[e]];
  }
  float cs[8];
  load_scales8(a, j, cs);
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] = ok[e] ? scaled(a, o[e], cs[e]) : Cvt<T>::from_f(qnan());
}

// Eight elements (16 bytes of fp16 / bf16, 32 of fp32) to 16-byte aligned `dst`.
template <typename T>
__device__ __forceinline__ void store8(T* dst, const T (&o)[8]) {
  constexpr int kVecs = sizeof(T) * 8 / 16;
#pragma unroll
  for (int v = 0; v < kVecs; ++v)
    reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(o)[v];
}

// Rows m >= M of xs (tile order: up to the next multiple of the tile's tokens, xs_rows) are
// zeros. shift: log2 of the tile's tokens (tile order).
template <typename T, XOrder O>
__global__ void __launch_bounds__(kGatherThreads)
    gather_direct_kernel(XArgs<T> a, T* __restrict__ xs, int M, int xs_rows, int K, int shift) {
  // x may come from the previous kernel. Only then may the GEMM be scheduled: its prologue
  // reads the weights before its own wait, and everything before this kernel is done now.
  wait_prior_grid();
  allow_next_grid();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // one 8-row chunk
  const int chunks = K / 8;
  if (i >= int64_t(xs_rows) * chunks) return;
  const int m = int(i / chunks), c = int(i % chunks);
  alignas(16) T o[8];
  if (m < M) {
    int src[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) src[e] = chunk_source<O>(a, c, e);
    load8(a, a.x + int64_t(m) * K, src, K, o);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = Cvt<T>::from_f(0.f);
  }
  store8(xs + chunk_dst<O>(m, c, K, shift), o);
}

// Source of an element in the staged kernel's table: its column of the staged row, or
// kBadSource for a perm entry outside [0, K) (K < kBadSource: rows are at most
// kGatherStagedMaxBytes).
constexpr uint16_t kBadSource = 0xFFFF;
static_assert(kStagedMaxBytes / 2 < kBadSource, "gather: 16-bit sources");
static_assert(2 * kStagedMaxBytes + 16 * 1024 <= 227 * 1024, "gather: two rows a CTA on sm_90");

// Shared memory of a staged CTA (layout in the header; row_bytes = K * sizeof(T)) and the share
// of a part.
constexpr int kSourceBytesPerChunk = 8 * int(sizeof(uint16_t));
__host__ __device__ constexpr int staged_share(int chunks, int parts) {
  return (chunks + parts - 1) / parts;
}
__host__ __device__ constexpr int staged_smem_bytes(int row_bytes, int share) {
  return 2 * row_bytes + share * kSourceBytesPerChunk;
}

// CTA (r, part), r < row_ctas: chunks [part share) of rows r, r + row_ctas, ... < xs_rows.
// Rows m >= M (tile order's padding) are written as zeros.
template <typename T, XOrder O>
__global__ void __launch_bounds__(kStagedThreads, 4)
    gather_staged_kernel(XArgs<T> a, T* __restrict__ xs, int M, int xs_rows, int K, int parts,
                         int row_ctas, int shift) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int chunks = K / 8;
  const int share = staged_share(chunks, parts);
  uint16_t* src = reinterpret_cast<uint16_t*>(smem + 2 * K * int(sizeof(T)));
  const int part = blockIdx.x % parts, r0 = blockIdx.x / parts;
  const int c0 = part * share, c1 = min(chunks, c0 + share);
  // x and perm may come from the previous kernel. Only then may the GEMM be scheduled: its
  // prologue reads the weights before its own wait, and everything before this kernel is done.
  wait_prior_grid();
  allow_next_grid();
  for (int c = c0 + threadIdx.x; c < c1; c += kStagedThreads) {
    alignas(16) uint16_t s8[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int j = chunk_source<O>(a, c, e);
      s8[e] = unsigned(j) < unsigned(K) ? uint16_t(j) : kBadSource;
    }
    *reinterpret_cast<uint4*>(src + 8 * (c - c0)) = *reinterpret_cast<const uint4*>(s8);
  }
  // K % 8 == 0, so every row is 16-byte aligned when x is
  const bool vec = reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  for (int m = r0, buf = 0; m < xs_rows; m += row_ctas, buf ^= 1) {
    T* srow = reinterpret_cast<T*>(smem) + buf * K;
    if (m >= M) {
      alignas(16) T zero[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) zero[e] = Cvt<T>::from_f(0.f);
      for (int c = c0 + threadIdx.x; c < c1; c += kStagedThreads)
        store8(xs + chunk_dst<O>(m, c, K, shift), zero);
      continue;
    }
    const T* row = a.x + int64_t(m) * K;
    constexpr int kUnroll = 4;  // loads in flight per thread
    for (int cb = threadIdx.x; cb < chunks; cb += kUnroll * kStagedThreads) {
      alignas(16) T v[kUnroll][8];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = cb + u * kStagedThreads;
        if (c >= chunks) break;
        if (vec) {
#pragma unroll
          for (int q = 0; q < int(sizeof(T)) * 8 / 16; ++q)
            reinterpret_cast<uint4*>(v[u])[q] = load16_l2(row + 8 * c + q * (16 / sizeof(T)));
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) v[u][e] = row[8 * c + e];
        }
      }
      // scaled one chunk at a time (channel_scale is small and read by every row: L1 hits),
      // which keeps the registers of four chunks' scales free
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = cb + u * kStagedThreads;
        if (c >= chunks) break;
        if (a.cs_kind != kAuxNone) {
          int j[8];
          float cs[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) j[e] = 8 * c + e;
          load_scales8(a, j, cs);
#pragma unroll
          for (int e = 0; e < 8; ++e) v[u][e] = scaled(a, v[u][e], cs[e]);
        }
        store8(srow + 8 * c, v[u]);
      }
    }
    // The row is staged. Its buffer was last read two rows ago, before the previous barrier.
    __syncthreads();
    for (int c = c0 + threadIdx.x; c < c1; c += kStagedThreads) {
      alignas(16) uint16_t s8[8];
      *reinterpret_cast<uint4*>(s8) = *reinterpret_cast<const uint4*>(src + 8 * (c - c0));
      alignas(16) T o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e)
        o[e] = s8[e] == kBadSource ? Cvt<T>::from_f(qnan()) : srow[s8[e]];
      store8(xs + chunk_dst<O>(m, c, K, shift), o);
    }
  }
}

// xs_rows >= M: the rows of xs (more in tile order, the padding written as zeros).
template <typename T, XOrder O>
void launch_gather(const XArgs<T>& a, T* xs, int64_t M, int64_t xs_rows, int K, int shift,
                   cudaStream_t stream) {
  const size_t row_bytes = size_t(K) * sizeof(T);
  // the device's shared memory for one CTA; two rows and a part's sources must fit
  const int limit = smem_optin_limit();
  if (gather_staged(M, int64_t(row_bytes), knobs()) &&
      staged_smem_bytes(int(row_bytes), 1) <= limit) {
    auto kernel = gather_staged_kernel<T, O>;
    static int ready[64] = {};
    allow_smem_once(ready, kernel, size_t(limit));
    // Several CTAs per row while there are fewer rows than SMs (each stages the whole row), and
    // at least as many as keep a part's sources beside the two rows.
    const int chunks = K / 8;
    const int max_share = (limit - 2 * int(row_bytes)) / kSourceBytesPerChunk;  // >= 1 (above)
    const int parts = std::max(int(std::clamp<int64_t>(sm_count() / M, 1, 4)),
                               (chunks + max_share - 1) / max_share);
    const int smem = staged_smem_bytes(int(row_bytes), staged_share(chunks, parts));
    // Rows are dealt to the CTAs that fit on the device at once, so that each reads its
    // sources once for many rows.
    int resident = 1;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel,
                                                                 kStagedThreads, size_t(smem)));
    const int row_ctas = int(std::clamp<int64_t>(
        int64_t(sm_count()) * std::max(resident, 1) / parts, 1, xs_rows));
    launch_chained(kernel, dim3(unsigned(row_ctas * parts)), dim3(kStagedThreads), size_t(smem),
                   stream, a, xs, int(M), int(xs_rows), K, parts, row_ctas, shift);
  } else {
    const int64_t n = xs_rows * (K / 8);
    const unsigned grid = unsigned((n + kGatherThreads - 1) / kGatherThreads);
    launch_chained(gather_direct_kernel<T, O>, dim3(grid), dim3(kGatherThreads), 0, stream, a,
                   xs, int(M), int(xs_rows), K, shift);
  }
}

template <typename T>
void gather_t(const at::Tensor& x, const int32_t* perm, const at::Tensor& cs, at::Tensor& xs,
              XOrder order, int shift) {
  const XArgs<T> a{reinterpret_cast<const T*>(x.data_ptr()), perm,
                   cs.defined() ? cs.data_ptr() : nullptr,
                   cs.defined() ? aux_kind(cs) : int(kAuxNone)};
  T* out = reinterpret_cast<T*>(xs.data_ptr());
  const int64_t M = x.size(0), R = xs.size(0);
  const int K = int(x.size(1));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (order) {
    case XOrder::kPlain: launch_gather<T, XOrder::kPlain>(a, out, M, R, K, 0, stream); break;
    case XOrder::kMma: launch_gather<T, XOrder::kMma>(a, out, M, R, K, 0, stream); break;
    case XOrder::kTile: launch_gather<T, XOrder::kTile>(a, out, M, R, K, shift, stream); break;
  }
}

}  // namespace

void gather_x(const at::Tensor& x, const at::Tensor& perm, const std::optional<at::Tensor>& cs,
              at::Tensor& xs, XOrder order, int tile_tokens) {
  if (x.size(0) == 0 || x.size(1) == 0) return;
  const bool tile = order == XOrder::kTile;
  const int shift = tile && tile_tokens > 0 ? __builtin_ctz(unsigned(tile_tokens)) : 0;
  TORCH_CHECK(x.size(1) % (tile ? kBlockRows : 8) == 0 && xs.is_contiguous() &&
                  x.is_contiguous() && xs.size(1) == x.size(1) &&
                  (tile ? tile_tokens >= 8 && tile_tokens == (1 << shift) &&
                              xs.size(0) ==
                                  (x.size(0) + tile_tokens - 1) / tile_tokens * tile_tokens
                        : xs.size(0) == x.size(0)),
              "mbwq: internal: gather_x needs contiguous x and xs of matching shapes and K % 8 == "
              "0 (tile order: K % 32 == 0, tiles of a power of two >= 8 tokens, here ",
              tile_tokens, "), got x ", x.sizes(), ", xs ", xs.sizes());
  const at::Tensor cs_t = cs.has_value() ? aux_tensor(*cs) : at::Tensor();
  const int32_t* p = perm.numel() > 0 ? perm.data_ptr<int32_t>() : nullptr;
  switch (x.scalar_type()) {
    case at::kHalf: gather_t<__half>(x, p, cs_t, xs, order, shift); break;
    case at::kBFloat16: gather_t<__nv_bfloat16>(x, p, cs_t, xs, order, shift); break;
    case at::kFloat: gather_t<float>(x, p, cs_t, xs, order, shift); break;
    default: TORCH_CHECK(false, "mbwq: internal: gather_x has no ", x.scalar_type(), " kernel");
  }
}

}  // namespace cuda
}  // namespace mbwq
