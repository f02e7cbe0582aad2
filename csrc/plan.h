// Every dispatch decision of mbwq::gemm, as data: the path boundaries, the mma.sync kernel's
// configuration table with its validity predicate, the tile kernel's token tiles, and the one
// split search both tensor-core kernels use. Pure host C++ with no CUDA in it, so it is built
// into the CPU-only library too: torch.ops.mbwq.plan (mbwq_ops.plan) answers from this code on
// any machine, and the tests, the benchmark and the docs ask it instead of restating rules.
//
// Inputs are shapes, dtypes, pointer alignment and two device facts (multiprocessor count,
// whether the wgmma tile kernel can run); never tensor values. Measurements behind the
// numbers: benchmarks/ (csrc/cuda/README.md says which section).
#pragma once
#include <cstdint>
#include <string>

namespace mbwq {

// ---- tuning overrides -------------------------------------------------------------------
// 0 = no override. Initial values come from the MBWQ_* environment variables named beside
// each field, read once (the first time any is needed); set_knob changes one at run time
// (mbwq_ops.ops.tuning for benchmarks and tests). Results never depend on them beyond fp32
// rounding: the order of fp32 additions, and the fold row's scale after the product.
struct Knobs {
  int tile_min_m = 0;    // MBWQ_TILE_MIN_M: fewest rows on the tile kernel
  int tile_max_m = 0;    // MBWQ_TILE_MAX_M: most rows on the tile kernel
  int tile_tokens = 0;   // MBWQ_TILE_TOKENS: force a token tile (16, 32, 64, 128, 256)
  int tile_splits = 0;   // MBWQ_TILE_SPLITS: force the tile kernel's K splits
  int mma_max_m = 0;     // MBWQ_MMA_MAX_M: most rows on the mma.sync path
  int mma_splits = 0;    // MBWQ_MMA_SPLITS: force the mma.sync kernel's K splits
  int mma_wc = 0;        // MBWQ_MMA_WC: force its column warps (1, 2, 4, 8) where allowed
  int gather_min_m = 0;  // MBWQ_GATHER_MIN_M: fewest rows for the staged x gather
  int no_wgmma = 0;      // MBWQ_MMA_NO_WGMMA: 1 = no tile kernel (other devices' paths)
  int no_pdl = 0;        // MBWQ_MMA_NO_PDL: 1 = plain launches, no programmatic chaining
  int mma_config = 0;    // MBWQ_MMA_CONFIG: 1 + the kMmaConfigs index to take where it is valid
  int tile_stream = 0;   // MBWQ_TILE_STREAM: the tile kernel's schedule, 1 = a grid of tiles x
                         // K splits, 2 = stream-K (Grid::ctas); 0 = the plan's choice
};
const Knobs& knobs();
// name: the environment variable's name (MBWQ_TILE_MIN_M, ...); value >= 0. Returns the
// previous value; throws std::invalid_argument on an unknown name or a bad value.
// reset_knobs() goes back to the environment's values.
int set_knob(const std::string& name, int64_t value);
void reset_knobs();
// "NAME=value,..." of the knobs that are not 0, in Knobs' order ("" for the plan's own
// choices): what a benchmark record says it ran under.
std::string knob_settings(const Knobs& k);

// ---- paths ------------------------------------------------------------------------------
enum class GemmPath : int {
  kEmpty = 0,          // M, N or K is 0: no kernel (y = bias, or zeros)
  kTile = 1,           // csrc/cuda/gemm_tile.cu: wgmma, weights decoded once per token tile
  kMma = 2,            // csrc/cuda/gemm_mma.cu: mma.sync, weights read once per row chunk
  kDequantMatmul = 3,  // gather x + dequantize W + cuBLAS (or the CPU's matmul)
};

// A layer of at least this many weights (K * N) is "large": where the tile kernel does not run,
// the mma.sync path takes it in row chunks up to kMmaChunkedMaxM rows.
constexpr int64_t kLargeLayerWeights = int64_t(1) << 25;  // e.g. 4096 x 8192
constexpr int64_t kMmaMaxM = 64;          // rows of one mma.sync call (a row chunk)
constexpr int64_t kMmaChunkedMaxM = 192;  // large layers: up to 3 chunks of kMmaMaxM rows
// The tile kernel from 33 rows, where mma.sync moves to its 64-row configurations: faster at
// 40-64 rows on 4096 x 1024 / 4096 / 6144 (benchmarks/2026-12-07_speed_round.md) as on the
// large layers.
constexpr int64_t kTileMinM = 33;
constexpr int64_t kTileMaxM = 256;
// The staged x gather (rows through shared memory) from this many rows, for rows of at most
// kGatherStagedMaxBytes bytes; element-wise below.
constexpr int64_t kGatherStagedMinM = 32;
constexpr int64_t kGatherStagedMaxBytes = 96 * 1024;
bool gather_staged(int64_t M, int64_t row_bytes, const Knobs& k);

// The CPU kernel (cpu/ops_cpu.cpp) multiplies block by block without materialising W up to
// this many rows, and dequantizes W for one matmul above.
constexpr int64_t kCpuDirectMaxM = 16;

// ---- mma.sync kernel (gemm_mma.cu) ---------------------------------------------------------
constexpr int kMmaWarps = 8;                // warps per CTA: WC column warps x 8 / WC k-warps
constexpr int kMmaMaxBlocksPerCta = 1024;   // 32-row blocks one CTA's table holds
constexpr int64_t kTwoQuadMinN = 8192;      // columns from which 17-64 tokens take 2 quads/lane

// One instantiation of the mma.sync kernel. MT token tiles of 8 (so 8 * MT tokens), QN quads of
// 4 columns per lane, STAGES ring slots per warp, MIN_CTAS resident CTAs per SM its registers
// are sized for; CTA_X: x copied once per XG-warp group instead of once per warp; FOLD: the
// scale after the product (csrc/cuda/mma_fold.cuh: raw codes into the mma, scale and zero once
// per group and column in fp32; one row of fp16 x). An opt_in row is taken only where
// MBWQ_MMA_CONFIG names it: it compiles and has its tests (tests/test_cuda.py forces every
// row), but no GPU measurement has made it a default yet.
struct MmaConfig {
  int max_m;             // the most rows it takes
  int mt, qn, stages, min_ctas;
  bool cta_x;
  int xg;
  bool needs_wide_n;     // only for N >= kTwoQuadMinN (two quads leave narrow layers few CTAs)
  bool fp16_only;        // fp16 x only: bf16's wider decode does not fit its registers, or
                         // (fold) the codes enter the mma as fp16 numbers
  int wc_options[2];     // column warps per CTA the split search may take (0 = unused slot)
  bool wc_knob;          // MBWQ_MMA_WC may force any column-warp count (x per warp only)
  bool fold;             // scale after the product (max_m 1, one token tile, x per warp, fp16)
  bool opt_in;           // only where MBWQ_MMA_CONFIG names it
};

// In order of preference: the first valid configuration is taken.
constexpr MmaConfig kMmaConfigs[] = {
    // max_m mt qn st ctas cta_x xg  wide   fp16   wc       knob   fold   opt_in
    {8,      1, 2, 4, 2,   false, 1, false, false, {1, 2}, true,  false, false},
    {16,     2, 2, 3, 2,   false, 1, false, false, {2, 1}, true,  false, false},
    {32,     4, 2, 3, 2,   true,  2, true,  false, {8, 0}, false, false, false},
    {32,     4, 1, 5, 2,   true,  2, false, false, {8, 0}, false, false, false},
    {64,     8, 2, 3, 1,   true,  1, true,  true,  {8, 0}, false, false, false},
    {64,     8, 1, 5, 2,   true,  1, false, false, {8, 0}, false, false, false},
    {1,      1, 2, 4, 2,   false, 1, false, true,  {1, 2}, true,  true,  true},
};
constexpr int kNumMmaConfigs = int(sizeof(kMmaConfigs) / sizeof(kMmaConfigs[0]));
constexpr bool fold_rows_are_one_fp16_row_per_warp() {
  for (const MmaConfig& c : kMmaConfigs)
    if (c.fold && (c.max_m != 1 || c.mt != 1 || c.cta_x || !c.fp16_only)) return false;
  return true;
}
static_assert(fold_rows_are_one_fp16_row_per_warp(), "fold: one row of fp16 x, x per warp");

bool mma_config_valid(const MmaConfig& c, int64_t M, int64_t N, bool fp16);
// Index into kMmaConfigs for 1 <= M <= kMmaMaxM rows: the first valid one that is not opt_in,
// or the one MBWQ_MMA_CONFIG names where that is valid.
int select_mma_config(int64_t M, int64_t N, bool fp16, const Knobs& k);

// A grid of CTAs over (column tiles, K splits).
struct Grid {
  int wc = 0;                // column warps per CTA (mma.sync; 0 for the tile kernel)
  int tiles = 0;             // CTAs along N (times token tiles for the tile kernel)
  int splits = 1;            // K splits (fp32 partials + an in-order reduction when > 1)
  int blocks_per_split = 0;  // 32-row blocks per split
  // Tile kernel, stream-K: this many persistent CTAs instead of the (tiles, splits) grid. The
  // tiles' 32-row blocks lie end to end (tiles x nblocks units) and CTA p takes units
  // [p U / ctas, (p + 1) U / ctas): every CTA the same work to one block, whatever the tile
  // count; tiles cut by a CTA boundary leave fp32 partials that a second kernel adds in CTA
  // order (gemm_tile.cu). 0: the grid.
  int ctas = 0;
};
// ---- stream-K (tile kernel) ----------------------------------------------------------------
// Its rules are plain arithmetic on ints, used by gemm_tile.cu's kernels on the device and by
// torch.ops.mbwq.tile_schedule on the host (the tests check them there, on any machine).
#if defined(__CUDACC__)
#define MBWQ_HOST_DEVICE __host__ __device__
#else
#define MBWQ_HOST_DEVICE
#endif

// One piece of a tile-kernel CTA's work: token tile mtile, column tile ntile, 32-row blocks
// [jb0, jb0 + nb) of K; part -1: the tile's whole K (the CTA writes y), else the fp32 partial
// slot it writes.
struct TilePiece {
  int mtile, ntile, jb0, nb, part;
};

// Grid::ctas CTAs over units = mtiles x ntiles x nblocks (< 2^31) laid end to end: unit u is
// block u % nblocks of tile u / nblocks, tile t = token tile t % mtiles, column tile t / mtiles.
// CTA p takes units [first_unit(p), first_unit(p + 1)), floor(p units / ctas) on: runs that
// differ by one unit at most. A piece ends at a tile edge or at the run's end, so a CTA's first
// and last piece may cover part of a tile: they write slots 2p and 2p + 1, and the tile's sum
// is those slots' in CTA order. All 32-bit (units = q ctas + r): the kernel's copy warps have
// 40 registers and a 64-bit division is a call.
struct StreamK {
  int mtiles, nblocks, ctas, q, r;

  MBWQ_HOST_DEVICE static StreamK of(int mtiles, int ntiles, int nblocks, int ctas) {
    const long long units = (long long)mtiles * ntiles * nblocks;
    return StreamK{mtiles, nblocks, ctas, int(units / ctas), int(units % ctas)};
  }
  MBWQ_HOST_DEVICE int first_unit(int p) const { return p * q + p * r / ctas; }
  // the CTA whose run holds unit u: the largest p with first_unit(p) <= u
  MBWQ_HOST_DEVICE int owner(int u) const {
    const long long units = (long long)q * ctas + r;
    return int(((long long)u + 1) * ctas / units + (((long long)u + 1) * ctas % units != 0)) - 1;
  }
  // The slot of CTA p's piece that starts at unit u (when it is partial): its first or last.
  MBWQ_HOST_DEVICE int part_slot(int p, int u) const { return 2 * p + (u != first_unit(p)); }
  // The slot CTA p's piece of tile `tile` writes: its piece starts at the later of its run's
  // start and the tile's.
  MBWQ_HOST_DEVICE int tile_slot(int p, int tile) const {
    const int f = first_unit(p), start = tile * nblocks;
    return part_slot(p, f > start ? f : start);
  }
  // CTA p's pieces in turn: u = first_unit(p) before the first call; each call sets pc to the
  // piece that starts at u and moves u past it; false once the run is done.
  MBWQ_HOST_DEVICE bool next(int p, int& u, TilePiece& pc) const {
    const int end = first_unit(p + 1);
    if (u >= end) return false;
    const int tile = u / nblocks, tile_end = (tile + 1) * nblocks;
    const int stop = end < tile_end ? end : tile_end;
    pc.mtile = tile % mtiles, pc.ntile = tile / mtiles;
    pc.jb0 = u - tile * nblocks, pc.nb = stop - u;
    pc.part = pc.jb0 == 0 && stop == tile_end ? -1 : part_slot(p, u);
    u = stop;
    return true;
  }
  // The tile that the run boundary at first_unit(b) cuts (1 <= b < ctas), if b is the first
  // boundary inside it, with the CTAs p0 .. p1 whose pieces it sums; else -1.
  MBWQ_HOST_DEVICE int cut_tile(int b, int& p0, int& p1) const {
    const int u = first_unit(b);
    if (u % nblocks == 0) return -1;  // on a tile edge
    const int tile = u / nblocks, start = tile * nblocks;
    p0 = owner(start);
    if (p0 + 1 != b) return -1;  // an earlier boundary cuts it too
    p1 = owner(start + nblocks - 1);
    return tile;
  }
};

// `slots`: CTAs resident on the whole device (SM count x CTAs per SM).
Grid mma_grid(const MmaConfig& c, int nblocks, int64_t N, int64_t M, double weight_bytes,
              int slots, const Knobs& k);

// ---- tile kernel (gemm_tile.cu) ------------------------------------------------------------
// Token tiles: the fewest of 16, 32, 64, 128, 256 that cover M (or MBWQ_TILE_TOKENS). A CTA
// takes 128 * min(4, 256 / tokens) columns (the accumulators fit 256 tokens x 128 columns).
// The schedule: the split grid, or stream-K where MBWQ_TILE_STREAM = 2 asks for it (the plan
// does not choose stream-K by itself until it has been measured against the grid).
bool is_tile_tokens(int t);
int tile_tokens(int64_t M, const Knobs& k);
constexpr int tile_columns(int tokens) { return 128 * (256 / tokens < 4 ? 256 / tokens : 4); }
Grid tile_grid(int64_t M, int64_t N, int nblocks, int tokens, int sm_count, const Knobs& k);

// ---- the plan ----------------------------------------------------------------------------
struct DeviceFacts {
  int sm_count = 0;
  bool wgmma = false;  // compute capability 9.0 with the sm_90a build (MBWQ_MMA_NO_WGMMA is a
                       // knob: plan_gemm applies it)
};

struct GemmPlan {
  GemmPath path = GemmPath::kEmpty;
  int tile_tokens = 0;      // kTile
  int mma_config = -1;      // kMma: kMmaConfigs index of the first row chunk
  int64_t chunk_rows = 0;   // kMma: rows per call (kMmaMaxM; the last chunk may be shorter)
  Grid grid;                // the first kernel's grid (kMma: for slots = SMs x min_ctas)
};

// R: qweight's rows (packed bytes = 4 R N). tensor_core_dtype: x is fp16 or bf16 (fp16: x is
// fp16). aligned: x, qweight, scales and zeros start on 16-byte boundaries (the kernels'
// 16-byte copies).
GemmPlan plan_gemm(int64_t M, int64_t K, int64_t N, int64_t R, bool tensor_core_dtype,
                   bool fp16, bool aligned, const DeviceFacts& dev, const Knobs& k);

}  // namespace mbwq
