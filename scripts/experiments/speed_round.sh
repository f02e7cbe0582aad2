#!/usr/bin/env bash
# The measurements of one round of issue #26, in one command for a GPU call, most decisive first
# (benchmarks/2026-12-07_speed_round.md says what each showed last time). Each step prints its
# table, also appended to $OUT/speed_round.log; Nsight Compute's full logs go to $SCRATCH (a lent
# device returns at most 8 files from $OUT), the bench records to $OUT. Steps stop being started
# once BUDGET seconds (default 420) have passed, so a call under the device's 10-minute limit
# still brings back what finished.
#   EXTRA='scripts/experiments/speed_round.sh' TESTS=... BENCH=0 scripts/gpu_check.sh
#   STEPS="m1_splits stack" scripts/experiments/speed_round.sh  # a subset, in this order
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/.device_out}
SCRATCH=${SCRATCH:-$(mktemp -d)}
mkdir -p "$OUT" "$SCRATCH"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-420}
SWEEP="$PY scripts/experiments/sweep_mma.py"
STEPS=${STEPS:-fold stream_k stack bench}
rc=0

run_step() {  # run_step NAME: the commands of one step
  case $1 in
    m1_splits)  # K splits at M = 1 on the decode stack's layers (in-kernel split reduction)
      $SWEEP --Ms 1 --formats q4_g128 --shapes 4096x4096,4096x6144,14336x4096,4096x1024 \
        --set MBWQ_MMA_SPLITS=0,1,2,3,4,6,8 ;;
    stack)  # the 32-block decode step (Llama-3-8B shapes), separate and fused projections
      $PY scripts/bench.py --shapes 4096x4096 --formats q4_g128,mixed_2.5 --Ms 1 --dtypes fp16 \
        --stack-blocks 32 --out "$OUT/stack.json" | grep -E "decode step|tok/s" ;;
    breakdown)  # kernels per call and their durations: stack shapes at M = 1, large M
      $PY scripts/experiments/kernel_breakdown.py
      $PY scripts/experiments/kernel_breakdown.py --shapes 4096x4096,8192x28672 --Ms 1024,4096 ;;
    tile_plan)  # the tile kernel's split choice (plan.cpp) against the count it chose before
      $SWEEP --Ms 128 --shapes 4096x4096,4096x6144,5120x5120 --set MBWQ_TILE_SPLITS=0,4,5
      $SWEEP --Ms 256 --shapes 4096x4096 --set MBWQ_TILE_SPLITS=0,3
      $SWEEP --Ms 64 --shapes 14336x4096,8192x8192 --set MBWQ_TILE_SPLITS=0,7,14
      $SWEEP --Ms 128 --shapes 2048x8192,8192x2048 --set MBWQ_TILE_SPLITS=0,1,10 ;;
    mma_splits)  # K splits at M = 1 on the large layers
      $SWEEP --Ms 1 --formats q4_g128,q2_g64 --shapes 8192x28672,28672x8192,4096x4096 \
        --set MBWQ_MMA_SPLITS=0,1,2,3,5,7 ;;
    m16)  # target 2 at 16 tokens: x per warp (default) or one x ring per warpgroup (row 3)
      $SWEEP --Ms 16 --formats q4_g128,mixed_2.5 --shapes 28672x8192,8192x28672 \
        --set MBWQ_MMA_CONFIG=0,4 ;;
    tile_splits)  # the tile kernel's K splits at 64-256 tokens
      $SWEEP --Ms 64,128,256 --shapes 8192x28672,4096x4096,8192x8192 \
        --set MBWQ_TILE_SPLITS=0,1,2,3,4,6,8 ;;
    fold)  # scale after the product (kMmaConfigs' fold row, MBWQ_MMA_CONFIG=7) against the
      # exact M <= 8 row at one row of fp16 x: side by side, then the bench's plain-read ratios
      # and the 32-block decode step with the row named, then Nsight Compute on both
      $SWEEP --Ms 1 --formats q4_g128,q2_g64,mixed_2.5,mixed_3.0 \
        --shapes 8192x28672,28672x8192,4096x4096,4096x14336,14336x4096 --set MBWQ_MMA_CONFIG=0,7
      MBWQ_MMA_CONFIG=7 $PY scripts/bench.py --shapes 8192x28672,28672x8192 --dtypes fp16 \
        --Ms 1 --formats q4_g128,q2_g64,mixed_2.5,mixed_3.0 --stack-blocks 32 \
        --out "$OUT/fold_m1.json" | grep -E "^\||decode step|tok/s"
      for c in 0 7; do  # per format: time, DRAM, issue use, instructions, the main stalls
        echo "--- MBWQ_MMA_CONFIG=$c"; mkdir -p "$SCRATCH/ncu_fold_$c"
        MBWQ_MMA_CONFIG=$c OUT="$SCRATCH/ncu_fold_$c" scripts/ncu_m1.sh 2>&1 | grep -E \
          "gpu__time|dram__throughput|issue_active|inst_executed|stalled_(short|long|math|wait|dispatch|not_sel)"
      done ;;
    stream_k)  # the tile kernel's stream-K schedule against its split grid (33-256 tokens)
      $SWEEP --Ms 40,64,128,256 --shapes 8192x28672,28672x8192 --set MBWQ_TILE_STREAM=1,2 --matmul
      $SWEEP --Ms 64,128,256 --shapes 4096x4096,8192x8192,4096x14336,14336x4096 \
        --set MBWQ_TILE_STREAM=1,2 ;;
    stream_k_bf16)  # the same in bf16 on the large layers
      $SWEEP --Ms 64,256 --dtype bfloat16 --shapes 8192x28672,28672x8192 \
        --set MBWQ_TILE_STREAM=1,2 ;;
    ncu_bf16)  # why bf16 x costs 1.7x the fp16 time at M = 1 (H100, 40933f4): the pipes' use
      # of gemm_mma with each dtype; the bf16 decode adds one F2FP.BF16.F32.PACK_AB and two
      # HADD2.F32 per weight pair; were the conversion 16 results per clock and SM (assumed,
      # unchecked) it alone would take ~63 us for the 8192 x 28672 layer
      # (benchmarks/2026-12-08_stream_k.md)
      for dt in float16 bfloat16; do
        ncu --clock-control none -k regex:mma_gemm --launch-skip 1 --launch-count 1 \
          --metrics "gpu__time_duration.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active" \
          $PY scripts/experiments/profile_gemm.py --Ms 1 --dtype $dt >"$SCRATCH/ncu_$dt.log" 2>&1
        echo "--- $dt"; grep -E "gpu__time|issue_active|pipe_" "$SCRATCH/ncu_$dt.log" |
          awk '$NF + 0 >= 1' | head -30
      done ;;
    large_m_tile)  # target 3 above 256 rows: the tile kernel (its grid and stream-K) against
      # dequantize + cuBLAS (MBWQ_TILE_MAX_M=0, the plan's 256), with torch.matmul beside
      $SWEEP --Ms 384,512,1024,2048 --shapes 8192x28672,4096x4096 --matmul \
        --set MBWQ_TILE_MAX_M=0,100000 --set MBWQ_TILE_STREAM=1,2 ;;
    fixed_cost)  # target 3's worst ratios (4096^2 and 8192^2 at 64-256 rows: 0.52-0.64x fp16
      # at 40933f4): which of the gather, the tile kernel and the split reduction takes the time
      $PY scripts/experiments/kernel_breakdown.py --shapes 4096x4096,8192x8192 --Ms 64,128,256 ;;
    tile33)  # the tile kernel's start at 33 rows on small layers (6cda237) against 65 before
      $SWEEP --Ms 33,36,40 --shapes 4096x4096,4096x6144,4096x1024,2048x2048,2048x8192 \
        --set MBWQ_TILE_MIN_M=0,65 ;;
    gather_large)  # large M: the x gather staged through shared memory (default) or direct
      $SWEEP --Ms 1024,4096 --shapes 4096x4096,8192x28672 --set MBWQ_GATHER_MIN_M=0,100000
      $PY scripts/experiments/kernel_breakdown.py --shapes 4096x4096 --Ms 4096
      MBWQ_GATHER_MIN_M=100000 $PY scripts/experiments/kernel_breakdown.py --shapes 4096x4096 \
        --Ms 4096 ;;
    tile_min)  # tile kernel or mma.sync at 40-64 tokens on small layers
      $SWEEP --Ms 40,48,56,64 --shapes 4096x4096,4096x6144 --set MBWQ_TILE_MIN_M=0,1 ;;
    ncu_tile)  # what limits the tile kernel at 256 and 64 tokens
      OUT="$SCRATCH" scripts/experiments/ncu_tile.sh 256 64 ;;
    bench)  # the bench record #26 asks for: bf16 beside fp16, M up to 4096, four layers, and
      # target 1's other formats at M = 1 (a second file of the same run: append its records
      # to the run file when copying it into benchmarks/runs/)
      $PY scripts/bench.py --dtypes fp16,bf16 --Ms 1,16,32,64,128,256,1024,4096 \
        --formats q4_g128,mixed_2.5 --stack-blocks 0 --out "$OUT"
      $PY scripts/bench.py --dtypes fp16 --Ms 1 --formats mixed_3.0,q2_g64 --stack-blocks 0 \
        --out "$OUT/m1_formats.json"
      $PY scripts/bench_targets.py "$OUT" --commit "${MBWQ_COMMIT:-$(git rev-parse HEAD)}" ;;
    *) echo "speed_round: unknown step $1" >&2; return 2 ;;
  esac
}

for s in $STEPS; do
  if [ "$SECONDS" -ge "$BUDGET" ]; then echo "=== $s: not started (${SECONDS}s of $BUDGET)"; continue; fi
  echo "=== $s (at ${SECONDS}s)"
  run_step "$s" 2>&1 | tee -a "$OUT/speed_round.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
done
exit $rc
