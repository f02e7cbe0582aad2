#!/usr/bin/env bash
# Nsight Compute reading of the GEMM kernel (the tile kernel from 33 rows, mma.sync below) on
# the 8192 x 28672 4-bit layer at each M given: throughput of the tensor pipe, L2 and shared
# memory against their peaks, DRAM bytes, issue use and warp stall reasons.
# Clocks as the card runs them (--clock-control none).
#   OUT=dir scripts/experiments/ncu_tile.sh [M ...]     # default M = 256; logs $OUT/ncu_tile_M.log
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/.device_out}
PY=${PYTHON:-python3}
METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
METRICS+=,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active
METRICS+=,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
METRICS+=,lts__t_sectors.avg.pct_of_peak_sustained_elapsed,lts__t_bytes.sum
METRICS+=,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed
METRICS+=,l1tex__throughput.avg.pct_of_peak_sustained_active,sm__cycles_active.avg
METRICS+=,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum
METRICS+=,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size
METRICS+=,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio
rc=0
for M in "${@:-256}"; do
  ncu --clock-control none --metrics "$METRICS" -k regex:"tile_gemm|mma_gemm" --launch-skip 1 \
    --launch-count 1 $PY scripts/experiments/profile_gemm.py --Ms "$M" >"$OUT/ncu_tile_$M.log" 2>&1 \
    || rc=1
  grep -E "tile_gemm|mma_gemm|gpu__time|dram__|lts__|l1tex|tensor|issue_active|inst_exec|cycles_active|grid_size|sm__throughput|stalled" \
    "$OUT/ncu_tile_$M.log" | grep -vE "stalled.* 0(\.0[0-9])?$" | head -45
done
exit $rc
