// Every schema of the mbwq library, in one place. Kernels live in cpu/ and cuda/; the
// dispatch plan and its tuning knobs (plan.h) are device-independent and registered here.
#include <Python.h>
#include <torch/library.h>

#include <stdexcept>
#include <vector>

#include "plan.h"

// An empty Python module so that `import mbwq_ops._C` loads this library (and with it the
// registrations below) without pybind11.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace mbwq {
namespace {

// The plan for a gemm of these shapes on a device of `sm_count` multiprocessors (wgmma: the
// tile kernel can run there), as [path, tile_tokens, mma_config, chunk_rows, wc, tiles,
// splits, blocks_per_split, ctas]; mbwq_ops.plan names the fields.
std::vector<int64_t> plan_op(int64_t M, int64_t K, int64_t N, int64_t R, at::ScalarType dtype,
                             int64_t sm_count, bool wgmma, bool aligned) {
  TORCH_CHECK_VALUE(M >= 0 && K >= 0 && N >= 0 && R >= 0 && sm_count >= 1,
                    "mbwq.plan: shapes must be >= 0 and sm_count >= 1, got M=", M, " K=", K,
                    " N=", N, " R=", R, " sm_count=", sm_count);
  DeviceFacts dev;
  dev.sm_count = int(sm_count);
  dev.wgmma = wgmma;
  const bool half = dtype == at::kHalf;
  const GemmPlan p = plan_gemm(M, K, N, R, half || dtype == at::kBFloat16, half, aligned, dev,
                               knobs());
  return {int64_t(p.path), p.tile_tokens, p.mma_config, p.chunk_rows, p.grid.wc, p.grid.tiles,
          p.grid.splits, p.grid.blocks_per_split, p.grid.ctas};
}

// The stream-K schedule of the tile kernel (plan.h: StreamK) as the kernels follow it, for the
// tests: [n, then n pieces of (cta, mtile, ntile, jb0, nb, part), then for every tile a run
// boundary cuts: (tile, number of CTAs k, then their k partial slots in CTA order)].
std::vector<int64_t> tile_schedule_op(int64_t mtiles, int64_t ntiles, int64_t nblocks,
                                      int64_t ctas) {
  const int64_t units = mtiles * ntiles * nblocks;
  TORCH_CHECK_VALUE(mtiles >= 1 && ntiles >= 1 && nblocks >= 1 && units < (int64_t(1) << 31) &&
                        ctas >= 1 && ctas <= units,
                    "mbwq.tile_schedule: needs mtiles, ntiles, nblocks >= 1, their product "
                    "< 2^31 and 1 <= ctas <= that product, got mtiles=", mtiles, " ntiles=",
                    ntiles, " nblocks=", nblocks, " ctas=", ctas);
  const StreamK sk = StreamK::of(int(mtiles), int(ntiles), int(nblocks), int(ctas));
  std::vector<int64_t> pieces, cuts;
  for (int p = 0; p < sk.ctas; ++p) {
    TilePiece pc;
    for (int u = sk.first_unit(p); sk.next(p, u, pc);)
      pieces.insert(pieces.end(), {p, pc.mtile, pc.ntile, pc.jb0, pc.nb, pc.part});
  }
  for (int b = 1; b < sk.ctas; ++b) {
    int p0 = 0, p1 = 0;
    const int tile = sk.cut_tile(b, p0, p1);
    if (tile < 0) continue;
    cuts.insert(cuts.end(), {tile, p1 - p0 + 1});
    for (int p = p0; p <= p1; ++p) cuts.push_back(sk.tile_slot(p, tile));
  }
  std::vector<int64_t> out{int64_t(pieces.size() / 6)};
  out.insert(out.end(), pieces.begin(), pieces.end());
  out.insert(out.end(), cuts.begin(), cuts.end());
  return out;
}

// Sets one tuning knob (plan.h: Knobs) and returns its previous value.
int64_t set_knob_op(std::string name, int64_t value) {
  try {
    return set_knob(name, value);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

void reset_knobs_op() { reset_knobs(); }

std::string knob_settings_op() { return knob_settings(knobs()); }

at::Tensor decode_mismatches_cpu(const at::Tensor& words) {
  TORCH_CHECK_VALUE(false, "mbwq.decode_mismatches checks the CUDA decoder: pass words on a CUDA "
                           "device, got ", words.device());
}

}  // namespace
}  // namespace mbwq

TORCH_LIBRARY(mbwq, m) {
  // The full weight W [K, N] in ORIGINAL input order (y = x @ W), K = 32 * blocks.size(0).
  // qweight int32 [R, N] (stored format), scales/zeros fp16 [G, N], blocks int32 [K/32, 3],
  // perm int32 [K] or [0] (identity); see format.h. Values are the fp16 single rounding of
  // code*scale - zero, then converted to `dtype` (float16 gives the original's bits exactly).
  m.def("dequant(Tensor qweight, Tensor scales, Tensor zeros, Tensor blocks, Tensor perm, "
        "ScalarType dtype) -> Tensor");

  // y = round(x * channel_scale) @ W + bias for x [M, K] (M >= 0), y [M, N] in x's dtype.
  // x * channel_scale is rounded to x's dtype first (as the original layer did); the product
  // is accumulated in fp32 and rounded once. channel_scale [K] and bias [N] are optional.
  // Kernels multiply by dequant's fp16 weights (bf16 activations: those rounded to bf16) or,
  // on the CPU's small-M path, by code*scale - zero rounded once to fp32 (at most half an
  // fp16 ulp from dequant's weight); never a factored form in fp16, so no intermediate
  // overflows where the plain dot product would not. (The opt-in fold row, MBWQ_MMA_CONFIG=7,
  // applies scale and zero after the product: every factored intermediate is fp32, at most
  // 255 |x| K in size.)
  m.def("gemm(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor blocks, Tensor perm, "
        "Tensor? channel_scale, Tensor? bias) -> Tensor");

  // The kernel choice for a gemm of these shapes (plan.h: plan_gemm) on a device with
  // `sm_count` multiprocessors, wgmma = the tile kernel can run there. R: qweight's rows.
  // Host-only, device-independent: answers on a CPU-only build as on a GPU one.
  m.def("plan(int M, int K, int N, int R, ScalarType dtype, int sm_count, bool wgmma, "
        "bool aligned=True) -> int[]", &mbwq::plan_op);
  // The tile kernel's stream-K schedule (plan.h: StreamK) for these tile and block counts on
  // `ctas` CTAs: the pieces each CTA computes and the partial slots each cut tile sums (layout:
  // ops.cpp, tile_schedule_op). For tests; host-only.
  m.def("tile_schedule(int mtiles, int ntiles, int nblocks, int ctas) -> int[]",
        &mbwq::tile_schedule_op);
  // Tuning knobs for benchmarks and tests (plan.h: Knobs): set one by its environment name and
  // get its previous value back; reset_knobs() returns to the environment's values.
  m.def("set_knob(str name, int value) -> int", &mbwq::set_knob_op);
  m.def("reset_knobs() -> ()", &mbwq::reset_knobs_op);
  // The knobs that are set (not 0), as "NAME=value,..." ("" when the plan chooses everything).
  m.def("knob_settings() -> str", &mbwq::knob_settings_op);

  // Self-check of the CUDA tensor-core decoder (cuda/decode_check.cu): for every word pair of
  // words (int32 [n, 2]), every width and lane position, the number of decoded fp16 code pairs
  // that differ from the plain reference decode. For tests; CUDA only.
  m.def("decode_mismatches(Tensor words) -> Tensor");
}

TORCH_LIBRARY_IMPL(mbwq, CPU, m) { m.impl("decode_mismatches", &mbwq::decode_mismatches_cpu); }
