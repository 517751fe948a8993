#!/usr/bin/env bash
# One command for a machine with a GPU: builds the plugin against python3's
# torch (no .venv, no GoogleTest, no network needed), runs the CUDA tests,
# then the GPU benchmark, and ends with a short summary table. Every step is
# bounded by `timeout` so that the whole run stays under 8 minutes.
#
#   scripts/gpu-check.sh            (PYTHON, BUILD_DIR override the defaults)
#
# The log, the pytest output and JUnit XML, and the benchmark table go to $OUT
# when it is set, else to $BUILD_DIR/gpu-check/. Exit status 0 only when the
# build and the tests passed and the benchmark ran.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUILD_DIR=${BUILD_DIR:-build-gpu}
# Seconds per step: 450 in all, under 8 minutes with room for start-up.
BUILD_TIMEOUT=${BUILD_TIMEOUT:-210}
TEST_TIMEOUT=${TEST_TIMEOUT:-180}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-60}

results=${OUT:-$BUILD_DIR/gpu-check}
mkdir -p "$results"
results=$(cd "$results" && pwd)

summary_rows=()
add_row() { summary_rows+=("$(printf '%-10s %-8s %6ss  %s' "$1" "$2" "$3" "$4")"); }
status_word() {
  case "$1" in
    0) echo ok ;;
    124 | 137) echo TIMEOUT ;;
    *) echo "FAIL($1)" ;;
  esac
}

main() {
  echo "== gpu-check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), results in $results"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
  fi
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
      "| CUDA", torch.version.cuda, "| GPU available:", torch.cuda.is_available())' \
    || { echo "gpu-check: $PYTHON cannot import torch"; return 1; }
  # Without a visible GPU every CUDA test skips: that is not a pass here.
  local gpu_seen
  gpu_seen=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)
  [ "$gpu_seen" = 1 ] || echo "gpu-check: WARNING: torch sees no CUDA device; the tests will skip and the check fails"
  cmake --version | head -1
  if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -1; fi

  # ---- build
  echo "== build into $BUILD_DIR (limit ${BUILD_TIMEOUT}s)"
  local start=$SECONDS
  PYTHON=$PYTHON BUILD_DIR=$BUILD_DIR timeout -k 10 "$BUILD_TIMEOUT" \
    scripts/build.sh -DTORCH_SPARSITY_BUILD_TESTS=OFF
  local build_status=$?
  local library=$PWD/$BUILD_DIR/libtorch_sparsity.so
  local kernels
  kernels=$(sed -n 's/.*torch-sparsity: CUDA kernels //p' "$BUILD_DIR/configure.log" 2>/dev/null)
  if [ "$build_status" -eq 0 ] && [ ! -f "$library" ]; then build_status=1; fi
  add_row build "$(status_word "$build_status")" $((SECONDS - start)) "CUDA kernels ${kernels:-?}; $library"

  local test_status=1 bench_status=1 test_line="not run"
  if [ "$build_status" -eq 0 ]; then
    # ---- CUDA tests
    echo "== CUDA tests (limit ${TEST_TIMEOUT}s)"
    start=$SECONDS
    if "$PYTHON" -c 'import pytest' 2>/dev/null; then
      TORCH_SPARSITY_LIBRARY=$library timeout -k 10 "$TEST_TIMEOUT" \
        "$PYTHON" -m pytest tests/python/test_cuda.py -q -rs -p no:cacheprovider \
        --junitxml="$results/pytest-cuda.xml" 2>&1 | tee "$results/pytest-cuda.txt"
      test_status=${PIPESTATUS[0]}
      test_line=$(grep -E "[0-9]+ (passed|failed|errors?|skipped)" "$results/pytest-cuda.txt" | tail -1 \
        | sed 's/=//g; s/^ *//; s/ *$//')
    else
      echo "gpu-check: pytest is not installed for $PYTHON; the CUDA tests cannot run"
      test_line="pytest not installed"
    fi
    local test_word
    test_word=$(status_word "$test_status")
    if [ "$gpu_seen" != 1 ]; then test_status=1 test_word=NO-GPU; fi
    add_row tests "$test_word" $((SECONDS - start)) "${test_line:-no pytest summary}"

    # ---- benchmark
    echo "== benchmark (limit ${BENCH_TIMEOUT}s)"
    start=$SECONDS
    TORCH_SPARSITY_LIBRARY=$library timeout -k 10 "$BENCH_TIMEOUT" \
      "$PYTHON" scripts/bench_gpu.py --out "$results/bench_gpu.txt"
    bench_status=$?
    local bench_table="no table"
    if [ "$bench_status" -eq 0 ]; then bench_table="table in $results/bench_gpu.txt"; fi
    add_row benchmark "$(status_word "$bench_status")" $((SECONDS - start)) "$bench_table"
  else
    echo "gpu-check: the build failed; nothing to test"
  fi

  echo
  if [ "$bench_status" -eq 0 ] && [ -f "$results/bench_gpu.txt" ]; then
    echo "== benchmark: copy and fake_sparsity rows"
    grep -E "elements|---|copy|fake_sparsity," "$results/bench_gpu.txt"
    echo
  fi
  echo "== gpu-check summary (${SECONDS}s in all)"
  printf '%-10s %-8s %7s  %s\n' step status time details
  printf '%s\n' "${summary_rows[@]}"
  [ "$build_status" -eq 0 ] && [ "$test_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
}

main 2>&1 | tee "$results/gpu-check.log"
exit "${PIPESTATUS[0]}"
