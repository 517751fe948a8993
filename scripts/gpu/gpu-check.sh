#!/usr/bin/env bash
# One command for a machine with a GPU: builds the plugin against python3's
# torch (no .venv, no GoogleTest, no network needed) unless LIBRARY names one
# already built for it, runs the GPU benchmark with its bitwise check, then
# the CUDA tests, and ends with a short summary table. Every step is bounded
# by `timeout`.
#
#   scripts/gpu/gpu-check.sh     (PYTHON, BUILD_DIR, LIBRARY, COMMIT, the
#                                 *_TIMEOUT below and BENCH_ARGS, more
#                                 bench_gpu.py arguments, override the defaults)
#
# The tests run verbosely; a test that kills pytest (a segfault) is named as
# crashed and the tests after it still run (scripts/gpu/pytest-retry-crashes.sh).
# The log (gpu-check.log), the pytest output (pytest-cuda.txt), one
# "STATUS node-id" line per test (pytest-cuda-results.txt), the benchmark
# table (bench_gpu.txt) and its JSON (bench_gpu.json: every row, the check,
# the GPU's name, torch, CUDA and COMMIT) go to $OUT when it is set, else to
# $BUILD_DIR/gpu-check/. The summary at the end names every test that failed,
# errored, crashed, timed out or did not run. Exit status 0 only when the
# build, the benchmark's check and the tests passed.
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
# The GPU machine has no scikit-build-core and no network: the plugin is
# built with CMake alone (INSTALL=0), Python imports torch_sparsity from this
# checkout and loads the library named by TORCH_SPARSITY_LIBRARY.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
BUILD_DIR=${BUILD_DIR:-build-gpu}
# A library built elsewhere for this torch (scripts/gpu/prebuild.sh): no build.
LIBRARY=${LIBRARY:-}
# Seconds per step (with a kill grace of 10 s each).
BUILD_TIMEOUT=${BUILD_TIMEOUT:-200}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
# pytest runs again after a crash (without the crashed test) at most this
# many times, within TEST_TIMEOUT.
MAX_CRASHES=${MAX_CRASHES:-3}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-90}

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

  # ---- build (or the library given)
  local start=$SECONDS build_status library kernels
  if [ -n "$LIBRARY" ]; then
    library=$LIBRARY
    [[ $library = /* ]] || library=$PWD/$library
    build_status=0
    [ -f "$library" ] || build_status=1
    kernels=$(sed -n 's/.*torch-sparsity: CUDA kernels //p' "$(dirname "$library")/configure.log" 2>/dev/null)
    add_row library "$(status_word "$build_status")" 0 "given, CUDA kernels ${kernels:-?}; $library"
  else
    echo "== build into $BUILD_DIR (limit ${BUILD_TIMEOUT}s)"
    PYTHON=$PYTHON BUILD_DIR=$BUILD_DIR INSTALL=0 timeout -k 10 "$BUILD_TIMEOUT" \
      scripts/build.sh -DTORCH_SPARSITY_BUILD_TESTS=OFF
    build_status=$?
    library=$BUILD_DIR/libtorch_sparsity.so
    [[ $library = /* ]] || library=$PWD/$library
    kernels=$(sed -n 's/.*torch-sparsity: CUDA kernels //p' "$BUILD_DIR/configure.log" 2>/dev/null)
    if [ "$build_status" -eq 0 ] && [ ! -f "$library" ]; then build_status=1; fi
    add_row build "$(status_word "$build_status")" $((SECONDS - start)) "CUDA kernels ${kernels:-?}; $library"
  fi

  local test_status=1 bench_status=1 test_line="not run"
  if [ "$build_status" -eq 0 ]; then
    # ---- benchmark, with its bitwise check first
    echo "== benchmark (limit ${BENCH_TIMEOUT}s)"
    start=$SECONDS
    TORCH_SPARSITY_LIBRARY=$library timeout -k 10 "$BENCH_TIMEOUT" \
      "$PYTHON" scripts/benchmarks/bench_gpu.py --check --runs 100 --out "$results/bench_gpu.txt" \
      --json "$results/bench_gpu.json" ${COMMIT:+--commit "$COMMIT"} ${BENCH_ARGS:-}
    bench_status=$?
    local bench_table="no table"
    if [ "$bench_status" -eq 0 ]; then bench_table="check ok; table in $results/bench_gpu.txt";
    elif [ "$bench_status" -eq 3 ]; then bench_table="CHECK FAILED (results not bit-exact); table in $results/bench_gpu.txt"; fi
    add_row benchmark "$(status_word "$bench_status")" $((SECONDS - start)) "$bench_table"

    # ---- CUDA tests: verbose, and a test that crashes pytest (a segfault)
    # is recorded and the tests after it run in a new pytest
    # (scripts/gpu/pytest-retry-crashes.sh), all within TEST_TIMEOUT.
    echo "== CUDA tests (limit ${TEST_TIMEOUT}s)"
    start=$SECONDS
    if "$PYTHON" -c 'import pytest' 2>/dev/null; then
      local summary_file
      summary_file=$(mktemp)
      PYTHON=$PYTHON TORCH_SPARSITY_LIBRARY=$library scripts/gpu/pytest-retry-crashes.sh \
        --limit "$TEST_TIMEOUT" --max-crashes "$MAX_CRASHES" --out "$results/pytest-cuda" \
        --summary "$summary_file" -- tests/python/test_cuda.py
      test_status=$?
      test_line=$(cat "$summary_file")
      rm -f "$summary_file"
    else
      echo "gpu-check: pytest is not installed for $PYTHON; the CUDA tests cannot run"
      test_line="pytest not installed"
    fi
    local test_word
    test_word=$(status_word "$test_status")
    if [ "$gpu_seen" != 1 ]; then test_status=1 test_word=NO-GPU; fi
    add_row tests "$test_word" $((SECONDS - start)) "${test_line:-no pytest summary}"
  else
    echo "gpu-check: the build failed; nothing to test"
  fi

  echo
  if [ -f "$results/bench_gpu.txt" ]; then
    echo "== benchmark: copy and fake_sparsity rows"
    grep -E "elements|---|copy|fake_sparsity," "$results/bench_gpu.txt"
    echo
  fi
  echo "== gpu-check summary (${SECONDS}s in all)"
  printf '%-10s %-8s %7s  %s\n' step status time details
  printf '%s\n' "${summary_rows[@]}"
  # Every test that did not pass or skip, by name (crashed ones with the signal).
  if [ -f "$results/pytest-cuda-results.txt" ]; then
    grep -vE '^(PASSED|SKIPPED|XFAIL|XPASS) ' "$results/pytest-cuda-results.txt" | sed 's/^/  test /'
  fi
  [ "$build_status" -eq 0 ] && [ "$test_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
}

main 2>&1 | tee "$results/gpu-check.log"
exit "${PIPESTATUS[0]}"
