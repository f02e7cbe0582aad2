// CPU kernels: plain, readable reference implementations of every op.
// They read the same layout as the CUDA kernels (stored qweight + blocks table, format.h), so
// a prepared layer can move between devices. On the CPU, reading tensor values costs no device
// sync, so the values of blocks and perm are checked here too (the CUDA kernels guard instead).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../plan.h"

namespace mbwq {
namespace {

// Round an exactly known value to fp16 once. Rounding double -> float -> half would round
// twice; rounding to float with "round to odd" first keeps the second rounding correct
// (float carries 13 more bits than half), so this equals a single IEEE rounding.
at::Half round_to_half(double d) {
  float f = static_cast<float>(d);
  if (static_cast<double>(f) != d && std::isfinite(f)) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u |= 1u;  // round to odd: mark "inexact" in the last bit
    std::memcpy(&f, &u, 4);
  }
  return at::Half(f);
}

// The stored weight of row r of a block (format.h): exact in double (code < 256 times an fp16
// scale, minus an fp16 zero), then one rounding to fp16, as the original computes it.
at::Half dequant_value(const uint32_t* words, int bits, int r, double scale, double zero) {
  return round_to_half(block_code(words, bits, r) * scale - zero);
}

void check_block_values(const at::Tensor& blocks, int64_t R, int64_t G) {
  const int32_t* b = blocks.data_ptr<int32_t>();
  for (int64_t j = 0; j < blocks.size(0); ++j) {
    const BlockEntry e = block_entry(b, j);
    TORCH_CHECK(valid_bits(e.bits), "mbwq: blocks[", j, "] has bits=", e.bits,
                "; allowed: 2, 3, 4, 5, 6, 8");
    // int64: a word near 2^31 must not wrap around and pass
    TORCH_CHECK(e.word >= 0 && int64_t(e.word) + e.bits <= R, "mbwq: blocks[", j,
                "] reads qweight rows ", e.word, "..", int64_t(e.word) + e.bits - 1,
                " but qweight has ", R, " rows");
    TORCH_CHECK(e.group >= 0 && e.group < G, "mbwq: blocks[", j, "] has group=", e.group,
                " but scales has ", G, " groups");
  }
}

void check_perm_values(const at::Tensor& perm) {
  const int64_t K = perm.numel();
  std::vector<char> seen(K, 0);
  const int32_t* p = perm.data_ptr<int32_t>();
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(p[k] >= 0 && p[k] < K && !seen[p[k]], "mbwq: perm is not a permutation of 0..",
                K - 1, ": perm[", k, "] = ", p[k]);
    seen[p[k]] = 1;
  }
}

// W in STORED row order, fp16, [K, N].
at::Tensor dequant_stored(const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, const at::Tensor& blocks) {
  const int64_t nblocks = blocks.size(0), N = qweight.size(1);
  at::Tensor W = at::empty({nblocks * kBlockRows, N}, scales.options());
  const uint32_t* q = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const at::Half* s = scales.data_ptr<at::Half>();
  const at::Half* z = zeros.data_ptr<at::Half>();
  const int32_t* b = blocks.data_ptr<int32_t>();
  at::Half* w = W.data_ptr<at::Half>();
  at::parallel_for(0, nblocks, 1, [&](int64_t j0, int64_t j1) {
    uint32_t words[8];
    for (int64_t j = j0; j < j1; ++j) {
      const BlockEntry e = block_entry(b, j);
      const int bits = e.bits;
      const int64_t word = e.word, group = e.group;
      for (int64_t n = 0; n < N; ++n) {
        for (int i = 0; i < bits; ++i) words[i] = q[(word + i) * N + n];
        const double sc = static_cast<float>(s[group * N + n]);
        const double ze = static_cast<float>(z[group * N + n]);
        for (int r = 0; r < kBlockRows; ++r)
          w[(j * kBlockRows + r) * N + n] = dequant_value(words, bits, r, sc, ze);
      }
    }
  });
  return W;
}

// Small M: y = xs @ W without materialising all of W. Each 32-row block is dequantized to
// float weights w = code * scale - zero (one float rounding, within half an fp16 ulp of
// dequant's fp16 weight; the same zeros and, past the fp16 range, the same infinities) a row
// of kCols columns at a time, and multiplied into the fp32 accumulators right away. So the
// sums are those of a plain dot product with W: no factored form such as
// s * sum(x c) - z * sum(x), whose partial terms overflow (x ~ 1e37) or turn one infinite x
// into NaN where the true product is finite or infinite. The column loops vectorise.
// Threads own disjoint column ranges and add in stored-row order: deterministic.
at::Tensor gemm_direct(const at::Tensor& xs, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& zeros, const at::Tensor& blocks) {
  const int64_t M = xs.size(0), K = xs.size(1), N = qweight.size(1);
  at::Tensor y = at::zeros({M, N}, xs.options());
  const float* x = xs.data_ptr<float>();
  const uint32_t* q = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const at::Half* sc = scales.data_ptr<at::Half>();
  const at::Half* ze = zeros.data_ptr<at::Half>();
  const int32_t* b = blocks.data_ptr<int32_t>();
  float* out = y.data_ptr<float>();
  constexpr int64_t kCols = 256;
  // fp16 rounds anything from 65520 on to infinity: the float weight does the same
  constexpr float kHalfOverflow = 65520.f;
  at::parallel_for(0, (N + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> w(kBlockRows * kCols), s(kCols), z(kCols);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * kCols, nc = std::min(kCols, N - n0);
      for (int64_t j = 0; j < K / kBlockRows; ++j) {
        const BlockEntry e = block_entry(b, j);
        const uint32_t mask = (1u << e.bits) - 1u;
        for (int64_t n = 0; n < nc; ++n) {
          s[n] = static_cast<float>(sc[int64_t(e.group) * N + n0 + n]);
          z[n] = static_cast<float>(ze[int64_t(e.group) * N + n0 + n]);
        }
        for (int r = 0; r < kBlockRows; ++r) {  // the code rule of format.h, for nc columns
          const int bit = r * e.bits, sh = bit & 31;
          const uint32_t* w0 = q + (int64_t(e.word) + (bit >> 5)) * N + n0;
          float* wr = &w[r * kCols];
          if (sh + e.bits > 32) {
            for (int64_t n = 0; n < nc; ++n)
              wr[n] = float(((w0[n] >> sh) | (w0[n + N] << (32 - sh))) & mask) * s[n] - z[n];
          } else {
            for (int64_t n = 0; n < nc; ++n) wr[n] = float((w0[n] >> sh) & mask) * s[n] - z[n];
          }
          for (int64_t n = 0; n < nc; ++n)
            if (std::fabs(wr[n]) >= kHalfOverflow) wr[n] = std::copysign(INFINITY, wr[n]);
        }
        for (int64_t m = 0; m < M; ++m) {
          float* o = out + m * N + n0;
          const float* xr = x + m * K + j * kBlockRows;
          for (int r = 0; r < kBlockRows; ++r) {
            const float xv = xr[r];
            const float* wr = &w[r * kCols];
            for (int64_t n = 0; n < nc; ++n) o[n] += xv * wr[n];
          }
        }
      }
    }
  });
  return y;
}

at::Tensor dequant_cpu(const at::Tensor& qweight_, const at::Tensor& scales_,
                       const at::Tensor& zeros_, const at::Tensor& blocks_,
                       const at::Tensor& perm_, at::ScalarType dtype) {
  check_weight_args(qweight_, scales_, zeros_, blocks_, perm_);
  check_dequant_dtype(dtype);
  const at::Tensor qweight = qweight_.contiguous(), scales = scales_.contiguous(),
                   zeros = zeros_.contiguous(), blocks = blocks_.contiguous(),
                   perm = perm_.contiguous();
  check_block_values(blocks, qweight.size(0), scales.size(0));
  at::Tensor Ws = dequant_stored(qweight, scales, zeros, blocks);
  if (perm.numel() > 0) {
    check_perm_values(perm);
    at::Tensor W = at::empty_like(Ws);
    W.index_copy_(0, perm.to(at::kLong), Ws);  // W[perm[k]] = Ws[k]
    Ws = W;
  }
  return Ws.to(dtype);
}

at::Tensor gemm_cpu(const at::Tensor& x, const at::Tensor& qweight_, const at::Tensor& scales_,
                    const at::Tensor& zeros_, const at::Tensor& blocks_, const at::Tensor& perm_,
                    const std::optional<at::Tensor>& channel_scale,
                    const std::optional<at::Tensor>& bias) {
  check_weight_args(qweight_, scales_, zeros_, blocks_, perm_);
  check_gemm_args(x, qweight_, blocks_, channel_scale, bias);
  const at::Tensor qweight = qweight_.contiguous(), scales = scales_.contiguous(),
                   zeros = zeros_.contiguous(), blocks = blocks_.contiguous(),
                   perm = perm_.contiguous();
  check_block_values(blocks, qweight.size(0), scales.size(0));
  // xs = x * channel_scale, rounded to x's dtype (the product of two fp16/bf16 values is
  // exact in fp32, so this is one rounding).
  at::Tensor xs = x.to(at::kFloat);
  if (channel_scale.has_value()) xs = (xs * channel_scale->to(at::kFloat)).to(x.scalar_type());
  xs = xs.to(at::kFloat);
  if (perm.numel() > 0) {
    check_perm_values(perm);
    xs = xs.index_select(1, perm.to(at::kLong));  // stored row k multiplies x[:, perm[k]]
  }
  // gemm_direct indexes rows of K floats: a transposed, sliced or expanded (stride 0) x that
  // is already fp32 arrives here as the caller's view
  xs = xs.contiguous();
  at::Tensor y = x.size(0) <= kCpuDirectMaxM
                     ? gemm_direct(xs, qweight, scales, zeros, blocks)
                     : at::mm(xs, dequant_stored(qweight, scales, zeros, blocks).to(at::kFloat));
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mbwq, CPU, m) {
  m.impl("dequant", &dequant_cpu);
  m.impl("gemm", &gemm_cpu);
}

}  // namespace mbwq
