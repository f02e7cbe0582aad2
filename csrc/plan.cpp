// The dispatch policy of plan.h. Host C++ only; the CUDA launchers and torch.ops.mbwq.plan
// (ops.cpp) both call these functions, so a threshold changes in exactly one place.
#include "plan.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace mbwq {

// ---- knobs --------------------------------------------------------------------------------
namespace {

struct KnobField {
  const char* name;
  int Knobs::*field;
};
constexpr KnobField kKnobFields[] = {
    {"MBWQ_TILE_MIN_M", &Knobs::tile_min_m},   {"MBWQ_TILE_MAX_M", &Knobs::tile_max_m},
    {"MBWQ_TILE_TOKENS", &Knobs::tile_tokens}, {"MBWQ_TILE_SPLITS", &Knobs::tile_splits},
    {"MBWQ_MMA_MAX_M", &Knobs::mma_max_m},     {"MBWQ_MMA_SPLITS", &Knobs::mma_splits},
    {"MBWQ_MMA_WC", &Knobs::mma_wc},           {"MBWQ_GATHER_MIN_M", &Knobs::gather_min_m},
    {"MBWQ_MMA_NO_WGMMA", &Knobs::no_wgmma},   {"MBWQ_MMA_NO_PDL", &Knobs::no_pdl},
    {"MBWQ_MMA_CONFIG", &Knobs::mma_config},   {"MBWQ_TILE_STREAM", &Knobs::tile_stream},
};

Knobs from_environment() {
  Knobs k;
  for (const KnobField& f : kKnobFields) {
    const char* v = std::getenv(f.name);
    k.*f.field = v ? std::max(0, std::atoi(v)) : 0;
  }
  return k;
}

Knobs& current() {
  static Knobs k = from_environment();
  return k;
}

}  // namespace

const Knobs& knobs() { return current(); }

int set_knob(const std::string& name, int64_t value) {
  if (value < 0 || value > (int64_t(1) << 30))
    throw std::invalid_argument("mbwq: knob " + name + " must lie in [0, 2^30], got " +
                                std::to_string(value));
  for (const KnobField& f : kKnobFields) {
    if (name == f.name) {
      const int previous = current().*f.field;
      current().*f.field = int(value);
      return previous;
    }
  }
  std::string known;
  for (const KnobField& f : kKnobFields) known += std::string(known.empty() ? "" : ", ") + f.name;
  throw std::invalid_argument("mbwq: unknown knob " + name + " (known: " + known + ")");
}

void reset_knobs() { current() = from_environment(); }

std::string knob_settings(const Knobs& k) {
  std::string s;
  for (const KnobField& f : kKnobFields)
    if (k.*f.field != 0)
      s += std::string(s.empty() ? "" : ",") + f.name + "=" + std::to_string(k.*f.field);
  return s;
}

// ---- the split search ---------------------------------------------------------------------
namespace {

// Both tensor-core kernels choose K splits the same way: every split count from s_min to
// s_max, rounded to whole blocks per split, priced by the kernel's cost model; the cheapest
// wins, ties (within 0.1 %) going to fewer splits. Returns the blocks per split.
template <typename Cost>
int cheapest_blocks_per_split(int nblocks, int s_min, int s_max, Cost cost, double* best_cost) {
  int best_bps = nblocks;
  double best = 1e300;
  for (int s = s_min; s <= std::max(s_min, s_max); ++s) {
    const int bps = (nblocks + s - 1) / s;
    const int splits = (nblocks + bps - 1) / bps;
    const double c = cost(splits, bps);
    if (c < best * 0.999) best = c, best_bps = bps;
  }
  if (best_cost) *best_cost = best;
  return best_bps;
}

int splits_of(int nblocks, int bps) { return (nblocks + bps - 1) / bps; }

}  // namespace

// ---- mma.sync kernel ----------------------------------------------------------------------
bool mma_config_valid(const MmaConfig& c, int64_t M, int64_t N, bool fp16) {
  return M >= 1 && M <= c.max_m && (!c.needs_wide_n || N >= kTwoQuadMinN) &&
         (!c.fp16_only || fp16);
}

int select_mma_config(int64_t M, int64_t N, bool fp16, const Knobs& k) {
  const int forced = k.mma_config - 1;
  if (forced >= 0 && forced < kNumMmaConfigs && mma_config_valid(kMmaConfigs[forced], M, N, fp16))
    return forced;
  for (int i = 0; i < kNumMmaConfigs; ++i)
    if (!kMmaConfigs[i].opt_in && mma_config_valid(kMmaConfigs[i], M, N, fp16)) return i;
  return -1;
}

// Cost model: the time is waves x (blocks per warp + the ring's ramp of `stages` blocks), and
// K splits add their fp32 partials' round trip relative to the weights' bytes.
Grid mma_grid(const MmaConfig& c, int nblocks, int64_t N, int64_t M, double weight_bytes,
              int slots, const Knobs& k) {
  const int warp_cols = 32 * c.qn;
  const bool forced_wc = c.wc_knob && (k.mma_wc == 1 || k.mma_wc == 2 || k.mma_wc == 4 ||
                                       k.mma_wc == 8);
  const int s_min = (nblocks + kMmaMaxBlocksPerCta - 1) / kMmaMaxBlocksPerCta;
  Grid best;
  double best_cost = 1e300;
  for (const int wc : c.wc_options) {
    if (wc == 0 || (forced_wc && wc != c.wc_options[0])) continue;
    const int WC = forced_wc ? k.mma_wc : wc;
    const int tiles = int((N + int64_t(WC) * warp_cols - 1) / (int64_t(WC) * warp_cols));
    const int WK = kMmaWarps / WC;
    int s_lo = s_min, s_hi = std::min(64, nblocks / (2 * WK));
    // forced splits are the only candidate, even where the model's range would not reach them
    if (k.mma_splits > 0) s_lo = s_hi = std::max(k.mma_splits, s_min);
    double cost = 0;
    const int bps = cheapest_blocks_per_split(
        nblocks, s_lo, s_hi,
        [&](int splits, int bps_) {
          const double waves = std::ceil(double(tiles) * splits / slots);
          const double per_warp = std::ceil(double(bps_) / WK) + c.stages;
          const double partial = splits > 1 ? 2.0 * splits * M * N * 4 / weight_bytes : 0.0;
          return waves * per_warp * (1.0 + partial);
        },
        &cost);
    if (cost < best_cost * 0.999) {
      best_cost = cost;
      best.wc = WC;
      best.tiles = tiles;
      best.blocks_per_split = bps;
      best.splits = splits_of(nblocks, bps);
    }
  }
  return best;
}

// ---- tile kernel --------------------------------------------------------------------------
bool is_tile_tokens(int t) { return t == 16 || t == 32 || t == 64 || t == 128 || t == 256; }

int tile_tokens(int64_t M, const Knobs& k) {
  if (is_tile_tokens(k.tile_tokens)) return k.tile_tokens;
  int tokens = 256;
  for (const int t : {128, 64, 32, 16})
    if (M <= t) tokens = t;
  return tokens;
}

// Cost model in microseconds: waves x (blocks per CTA + a ramp of 4) at ~0.3 us a block, plus
// the partials' round trip and the reduction kernel when there are K splits. The partials are
// priced at an L2 rate: a few MB written and read back at once mostly stay in L2 (the split
// sweeps in benchmarks/2026-12-07_speed_round.md show extra splits costing next to nothing). The
// 512-column tiles (16-64 tokens) leave few CTAs on narrow layers, so they may take up to 32
// splits of 8 blocks; the wider ones up to 16 splits of 16.
// Stream-K where the model prices it below kTileStreamGain x the grid's cost (kTileStreamByCost;
// until measured, only MBWQ_TILE_STREAM=2 asks for it).
constexpr bool kTileStreamByCost = false;
constexpr double kTileStreamGain = 0.95;

Grid tile_grid(int64_t M, int64_t N, int nblocks, int tokens, int sm_count, const Knobs& k) {
  constexpr double kBlockUs = 0.3, kPartialBytesPerUs = 6e6, kReduceUs = 4.0;
  const int cols = tile_columns(tokens);
  Grid g;
  g.tiles = int((M + tokens - 1) / tokens) * int((N + cols - 1) / cols);
  double grid_cost = 0;  // the model's price of the chosen grid (set by the search)
  if (k.tile_splits > 0) {
    const int s = std::min(k.tile_splits, nblocks);
    g.blocks_per_split = (nblocks + s - 1) / s;
  } else {
    const bool wide = cols >= 512;
    const int max_splits = wide ? 32 : 16, min_blocks = wide ? 8 : 16;
    g.blocks_per_split = cheapest_blocks_per_split(
        nblocks, 1, std::min(max_splits, std::max(1, nblocks / min_blocks)),
        [&](int splits, int bps) {
          const double waves = std::ceil(double(g.tiles) * splits / sm_count);
          double cost = waves * (bps + 4) * kBlockUs;
          if (splits > 1) cost += 2.0 * splits * M * N * 4 / kPartialBytesPerUs + kReduceUs;
          return cost;
        },
        &grid_cost);
  }
  g.splits = splits_of(nblocks, g.blocks_per_split);
  // Stream-K: one CTA per SM (the kernel's registers and shared memory allow no more), never
  // more CTAs than units, and 32-bit unit numbers (the kernel's arithmetic); blocks_per_split
  // and splits describe the grid it replaces.
  const int64_t units = int64_t(g.tiles) * nblocks;
  if (units <= 0 || units >= (int64_t(1) << 31) || k.tile_stream == 1) return g;
  const int ctas = int(std::min<int64_t>(std::max(1, sm_count), units));
  bool stream = k.tile_stream == 2;
  if (k.tile_stream == 0 && kTileStreamByCost && k.tile_splits == 0) {
    // the same model: a run of ceil(units / ctas) blocks, and where runs cut tiles, up to two
    // tile-sized partials a CTA and the second kernel
    double stream_cost = (std::ceil(double(units) / ctas) + 4) * kBlockUs;
    if (ctas > 1)
      stream_cost += 2.0 * 2 * ctas * tokens * cols * 4 / kPartialBytesPerUs + kReduceUs;
    stream = stream_cost < kTileStreamGain * grid_cost;
  }
  if (stream) g.ctas = ctas;
  return g;
}

// ---- x gather ----------------------------------------------------------------------------
bool gather_staged(int64_t M, int64_t row_bytes, const Knobs& k) {
  const int64_t min_rows = k.gather_min_m > 0 ? k.gather_min_m : kGatherStagedMinM;
  return M >= min_rows && row_bytes <= kGatherStagedMaxBytes;
}

// ---- the plan -----------------------------------------------------------------------------
GemmPlan plan_gemm(int64_t M, int64_t K, int64_t N, int64_t R, bool tensor_core_dtype,
                   bool fp16, bool aligned, const DeviceFacts& dev, const Knobs& k) {
  GemmPlan p;
  if (M == 0 || N == 0 || K == 0) return p;
  const bool large = K * N >= kLargeLayerWeights;
  const bool tensor_cores = tensor_core_dtype && K % 8 == 0 && N % 8 == 0 && aligned;
  const int nblocks = int(K / 32);

  const int64_t tile_min = k.tile_min_m > 0 ? k.tile_min_m : kTileMinM;
  const int64_t tile_max = k.tile_max_m > 0 ? k.tile_max_m : kTileMaxM;
  if (dev.wgmma && k.no_wgmma == 0 && tensor_cores && M >= tile_min && M <= tile_max) {
    p.path = GemmPath::kTile;
    p.tile_tokens = tile_tokens(M, k);
    p.grid = tile_grid(M, N, nblocks, p.tile_tokens, dev.sm_count, k);
    return p;
  }
  const int64_t mma_max = k.mma_max_m > 0 ? k.mma_max_m : large ? kMmaChunkedMaxM : kMmaMaxM;
  if (tensor_cores && M <= mma_max) {
    p.path = GemmPath::kMma;
    p.chunk_rows = std::min(M, kMmaMaxM);
    p.mma_config = select_mma_config(p.chunk_rows, N, fp16, k);
    const MmaConfig& c = kMmaConfigs[p.mma_config];
    // resident CTAs as the configuration is sized for; the launcher asks the device instead
    // (cudaOccupancyMaxActiveBlocksPerMultiprocessor), which gives the same on Hopper
    p.grid = mma_grid(c, nblocks, N, p.chunk_rows, 4.0 * double(R) * double(N),
                      std::max(1, dev.sm_count) * c.min_ctas, k);
    return p;
  }
  p.path = GemmPath::kDequantMatmul;
  return p;
}

}  // namespace mbwq
