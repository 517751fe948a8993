#!/usr/bin/env bash
# One command for a GPU lease: scripts/gpu/gpu-check.sh (build, CUDA tests,
# benchmark) and scripts/gpu/gpu-tune.sh (launch-setting variants) together in
# under 10 minutes, where run one after the other they take up to 13. The
# tune variants build in the background at the lowest CPU priority while
# gpu-check builds and the GPU runs the tests; then each variant is checked
# and timed. Ends with gpu-check's summary and the tune table (the device
# tool returns the end of the output). Everything else is in $OUT (or
# build-gpu/session/): gpu-check.log, pytest-cuda*.txt, bench_gpu.txt,
# gpu-tune-build.log, tune-build-<variant>.log, gpu-tune.log,
# gpu-tune-table.txt, gpu-tune.json.
#
#   OUT=$OUT scripts/gpu/gpu-session.sh          (device tool: timeout_s 600)
#
# SESSION_LIMIT (540) is the second after which no tune benchmark starts
# (each takes up to BENCH_TIMEOUT, 25 s). PYTHON, TUNE_VARIANTS, BENCH_ARGS
# and RUNS go to the scripts as they are. Exit status 0 when both passed.
set -uo pipefail
cd "$(dirname "$0")/../.."

SESSION_LIMIT=${SESSION_LIMIT:-540}
OUT=${OUT:-build-gpu/session}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT PYTHON=${PYTHON:-python3}

echo "== gpu-session: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), results in $OUT"
# The variants' builds wait for any core that gpu-check's build leaves idle.
TUNE_STEPS=build BUILD_TIMEOUT=${TUNE_BUILD_TIMEOUT:-300} nice -n 19 scripts/gpu/gpu-tune.sh >/dev/null 2>&1 &
tune_build=$!

scripts/gpu/gpu-check.sh
check_status=$?

echo "== gpu-session: waiting for the variants' builds ($((SECONDS))s so far)"
wait "$tune_build"
tune_build_status=$?
grep -E "^(==|--)" "$OUT/gpu-tune-build.log" | grep -v "^== gpu-tune" || true

left=$((SESSION_LIMIT - SECONDS))
echo "== gpu-session: checking and timing the variants (no benchmark starts after another ${left}s)"
TUNE_STEPS=bench TOTAL_LIMIT=$left scripts/gpu/gpu-tune.sh >/dev/null 2>&1
tune_status=$?
grep -E "^(== [a-z0-9._-]+ \(|-- |check:)" "$OUT/gpu-tune.log" || true

echo
echo "== gpu-check (status $check_status)"
sed -n '/^== \(benchmark: copy and fake_sparsity rows\|gpu-check summary\)/,$p' "$OUT/gpu-check.log"
echo
echo "== gpu-tune (builds: status $tune_build_status; checks and benchmarks: status $tune_status)"
cat "$OUT/gpu-tune-table.txt" 2>/dev/null || echo "no tune table; see $OUT/gpu-tune.log"
echo "== gpu-session done after ${SECONDS}s"
[ "$check_status" -eq 0 ] && [ "$tune_status" -eq 0 ]
