#!/usr/bin/env bash
# One command for a CUDA machine: build + install the package, run the CUDA tests, an optional
# extra command, the compute-sanitizer script (memcheck + racecheck), the quick benchmark and
# the demo, in that order.
#
#   scripts/gpu_check.sh             # logs under $OUT if set, else ./.device_out; the benchmark's
#                                    # run file (<date>_<commit>_<card>.json) there too: copy it
#                                    # into benchmarks/runs/ to keep it
#   BENCH=full scripts/gpu_check.sh  # full benchmark instead of --quick
#   DEMO=0 scripts/gpu_check.sh      # skip the demo
#   SANITIZE=0 scripts/gpu_check.sh  # skip compute-sanitizer
#   BENCH_ARGS="--Ms 1,16 --shapes 4096x4096" scripts/gpu_check.sh   # other bench selection
#   TESTS="tests/test_cuda.py" scripts/gpu_check.sh   # other pytest selection (default: every
#                                                      # test marked cuda, one process per file)
#   TESTS=0 BENCH=0 scripts/gpu_check.sh               # skip the tests / the benchmark
#   EXTRA="ncu ... python3 scripts/experiments/profile_gemm.py" scripts/gpu_check.sh   # one more command
#                                                      # after the tests (log: extra.log)
#
# Python wheels missing on the machine (e.g. expecttest for opcheck) are taken from ./.whl if
# that folder exists (on the lent device: pass `.whl` in carry). Exits non-zero if any step
# failed; every step runs regardless.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
# Pass MBWQ_COMMIT=<sha> when the tree was copied: its .git may not be the files' commit.
export MBWQ_COMMIT=${MBWQ_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
PY=${PYTHON:-python3}
declare -A RESULT
fail=0
step() {  # step NAME LOGFILE CMD...   (QUIET=1: log to the file only, print its tail)
  local name=$1 log=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS rc
  if [ -n "${QUIET:-}" ]; then
    "$@" >"$OUT/$log" 2>&1; rc=$?
    tail -n 5 "$OUT/$log"
  else
    "$@" 2>&1 | tee "$OUT/$log"; rc=${PIPESTATUS[0]}
  fi
  RESULT[$name]="rc=$rc ($((SECONDS - t0)) s)"
  [ "$rc" -eq 0 ] || fail=1
  return "$rc"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mbwq_site .whl/*.whl && export PYTHONPATH=/tmp/mbwq_site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/env.log"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/env.log"

# Compile against the libstdc++ that the Python process loads: a g++ whose headers are newer
# than the runtime library can inline stream code that crashes against it (seen on one CUDA
# image: /opt/gcc's g++ over the system libstdc++, segfaulting in every TORCH_CHECK message
# that formats an integer). Prefer the system compiler when the runtime library is the system's.
RUNTIME_STDCXX=$($PY -c 'import torch
print(next((l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l), "?"))')
{ echo "CXX=${CXX:-unset} g++=$(command -v g++) runtime libstdc++=$RUNTIME_STDCXX"
  g++ --version | head -1; ls /usr/bin/g++* 2>/dev/null; } | tee -a "$OUT/env.log"
if [ -x /usr/bin/g++ ] && [[ "$RUNTIME_STDCXX" == /usr/lib* ]]; then
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
elif STDCXX=$(${CXX:-g++} -print-file-name=libstdc++.so.6) && [ -f "$STDCXX" ]; then
  export LD_PRELOAD=$(readlink -f "$STDCXX")${LD_PRELOAD:+:$LD_PRELOAD}  # the compiler's own runtime
fi
echo "building with CXX=${CXX:-default} LD_PRELOAD=${LD_PRELOAD:-}" | tee -a "$OUT/env.log"

if ! QUIET=1 step build build.log $PY -m pip install --no-deps --no-build-isolation -v -e .; then
  grep -E "error|Error" "$OUT/build.log" | head -40; echo "build failed; see $OUT/build.log"; exit 1
fi
$PY -c 'import mbwq_ops, torch; assert torch.ops.mbwq.gemm.default.has_kernel_for_dispatch_key("CUDA"), "no CUDA kernel registered"' \
  || { echo "the CUDA kernels are not registered"; exit 1; }

# One pytest process per test file, so that a crash in one file cannot hide the others.
run_tests() {
  local rc=0 f
  if [ -n "${TESTS:-}" ]; then
    $PY -m pytest -q -rs -p no:cacheprovider $TESTS || rc=$?
  else
    for f in tests/test_*.py; do
      echo "--- $f"
      $PY -m pytest -q -rs -p no:cacheprovider -m cuda "$f"
      local r=$?
      [ $r -eq 0 ] || [ $r -eq 5 ] || { echo "--- $f: exit $r"; rc=1; }  # 5: no CUDA tests in it
    done
  fi
  return $rc
}
[ "${TESTS:-}" = 0 ] || step tests tests.log run_tests
# The extra command (usually an A/B sweep) before the sanitizers, which take the longest: if a
# call runs out of time, the measurements are what came back.
if [ -n "${EXTRA:-}" ]; then step extra extra.log bash -c "$EXTRA"; fi
SAN="compute-sanitizer --error-exitcode 1 --print-limit 20"
if [ "${SANITIZE:-1}" = 1 ]; then
  step memcheck memcheck.log $SAN --tool memcheck $PY scripts/sanitize_paths.py
  step racecheck racecheck.log $SAN --tool racecheck $PY scripts/sanitize_paths.py
  # the hostile-input fuzz cases that reach CUDA kernels (tests/test_fuzz.py), under memcheck
  step fuzz_memcheck fuzz_memcheck.log $SAN --tool memcheck $PY -m pytest -q -p no:cacheprovider \
    -m cuda tests/test_fuzz.py
fi
if [ "${BENCH:-}" = 0 ]; then
  :
elif [ -n "${BENCH_ARGS:-}" ]; then
  step bench bench.log $PY scripts/bench.py $BENCH_ARGS --out "$OUT"
elif [ "${BENCH:-quick}" = full ]; then
  step bench bench.log $PY scripts/bench.py --out "$OUT"
else
  step bench bench.log $PY scripts/bench.py --quick --out "$OUT"
fi

# The main job, as the README runs it (CUDA preset: ~0.9 B parameters, CUDA graphs);
# DEMO=0 skips it.
if [ "${DEMO:-1}" = 1 ]; then step demo demo.log $PY -m mbwq_ops demo; fi

echo "=== summary"
for k in build tests extra memcheck racecheck fuzz_memcheck bench demo; do echo "$k: ${RESULT[$k]:-not run}"; done
exit $fail
