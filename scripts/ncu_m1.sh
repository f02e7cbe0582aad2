#!/usr/bin/env bash
# Nsight Compute readings behind the M = 1 roofline (benchmarks/HISTORY.md): for gemm_mma on the
# 8192 x 28672 layer in each bench format, and for the read probes of
# scripts/experiments/read_ceiling.py
# (run that first: it writes $OUT/read_ceiling.json), the bytes read from DRAM, the achieved
# DRAM bandwidth, issue and occupancy figures and the warp stall reasons. Clocks are left
# as the card runs them (--clock-control none), so durations match the benchmark's.
#   OUT=dir scripts/ncu_m1.sh     # logs: $OUT/ncu_gemm_<format>.log, $OUT/ncu_read.log
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.device_out}
PY=${PYTHON:-python3}
METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_read.sum.per_second
METRICS+=,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__cycles_active.avg
METRICS+=,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum
METRICS+=,smsp__issue_active.avg.pct_of_peak_sustained_active,lts__t_bytes.sum
METRICS+=,sm__cycles_elapsed.avg.per_second,smsp__average_warp_latency_per_inst_issued.ratio
# stall reasons: cycles a warp spends in each state per instruction issued
METRICS+=,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio
NCU=(ncu --clock-control none --metrics "$METRICS")
rc=0
for f in q4_g128 mixed_2.5 q2_g64; do
  # profile_gemm runs each M twice: skip the warm-up call's GEMM
  "${NCU[@]}" -k regex:mma_gemm --launch-skip 1 --launch-count 1 \
    $PY scripts/experiments/profile_gemm.py --Ms 1 --format "$f" >"$OUT/ncu_gemm_$f.log" 2>&1 || rc=1
  grep -E "mma_gemm|gpu__time|dram__|issue_active|warps_active|inst_executed|cycles|stalled" \
    "$OUT/ncu_gemm_$f.log" | grep -vE "stalled.* 0(\.0[0-9])?$" | head -40
done
if [ -f "$OUT/read_ceiling.json" ]; then
  "${NCU[@]}" -k regex:read_ $PY scripts/experiments/read_ceiling.py \
    --profile "$OUT/read_ceiling.json" \
    >"$OUT/ncu_read.log" 2>&1 || rc=1
  grep -E "read_(linear|strips)|gpu__time|dram__bytes_read.sum |dram__throughput" \
    "$OUT/ncu_read.log" | head -80
fi
exit $rc
