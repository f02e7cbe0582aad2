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

void check_block_values(const at::Tensor& blocks, int64_t R, int64_t G) {
  const int32_t* b = blocks.data_ptr<int32_t>();
  for (int64_t j = 0; j < blocks.size(0); ++j) {
    const int32_t bits = b[j * kBlockCols + kColBits];
    const int32_t word = b[j * kBlockCols + kColWord];
    const int32_t group = b[j * kBlockCols + kColGroup];
    TORCH_CHECK(valid_bits(bits), "mbwq: blocks[", j, "] has bits=", bits,
                "; allowed: 2, 3, 4, 5, 6, 8");
    TORCH_CHECK(word >= 0 && word + bits <= R, "mbwq: blocks[", j, "] reads qweight rows ", word,
                "..", word + bits - 1, " but qweight has ", R, " rows");
    TORCH_CHECK(group >= 0 && group < G, "mbwq: blocks[", j, "] has group=", group,
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
      const int bits = b[j * kBlockCols + kColBits];
      const int64_t word = b[j * kBlockCols + kColWord];
      const int64_t group = b[j * kBlockCols + kColGroup];
      for (int64_t n = 0; n < N; ++n) {
        for (int i = 0; i < bits; ++i) words[i] = q[(word + i) * N + n];
        const double sc = static_cast<float>(s[group * N + n]);
        const double ze = static_cast<float>(z[group * N + n]);
        for (int r = 0; r < kBlockRows; ++r) {
          // exact in double: code < 256 and fp16 operands; then one rounding to fp16
          const double exact = block_code(words, bits, r) * sc - ze;
          w[(j * kBlockRows + r) * N + n] = round_to_half(exact);
        }
      }
    }
  });
  return W;
}

// Small M: y = xs @ W without materialising W. The 32 rows of a block share one scale and
// zero per column, so  sum_r x_r (c_r s - z) = s * sum_r x_r c_r - z * sum_r x_r : the inner
// loop is one multiply-add per code and row of x, over contiguous columns (vectorisable).
// Threads own disjoint column ranges and sum in a fixed order: deterministic.
constexpr int64_t kDirectMaxM = 16;

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
  at::parallel_for(0, (N + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> code(kCols), part(M * kCols);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * kCols, nc = std::min(kCols, N - n0);
      for (int64_t j = 0; j < K / kBlockRows; ++j) {
        const int bits = b[j * kBlockCols + kColBits];
        const int64_t word = b[j * kBlockCols + kColWord], group = b[j * kBlockCols + kColGroup];
        const uint32_t mask = (1u << bits) - 1u;
        std::fill(part.begin(), part.end(), 0.f);
        for (int r = 0; r < kBlockRows; ++r) {  // the code rule of format.h, for nc columns
          const int bit = r * bits, s = bit & 31;
          const uint32_t* w0 = q + (word + (bit >> 5)) * N + n0;
          if (s + bits > 32) {
            for (int64_t n = 0; n < nc; ++n)
              code[n] = float(((w0[n] >> s) | (w0[n + N] << (32 - s))) & mask);
          } else {
            for (int64_t n = 0; n < nc; ++n) code[n] = float((w0[n] >> s) & mask);
          }
          for (int64_t m = 0; m < M; ++m) {
            const float xv = x[m * K + j * kBlockRows + r];
            float* p = &part[m * kCols];
            for (int64_t n = 0; n < nc; ++n) p[n] += xv * code[n];
          }
        }
        for (int64_t m = 0; m < M; ++m) {
          float xsum = 0.f;
          for (int r = 0; r < kBlockRows; ++r) xsum += x[m * K + j * kBlockRows + r];
          for (int64_t n = 0; n < nc; ++n) {
            const float s_ = static_cast<float>(sc[group * N + n0 + n]);
            const float z_ = static_cast<float>(ze[group * N + n0 + n]);
            out[m * N + n0 + n] += s_ * part[m * kCols + n] - z_ * xsum;
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
  at::Tensor y = x.size(0) <= kDirectMaxM
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
