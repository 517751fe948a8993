#!/usr/bin/env bash
# The GPU check, one command for a machine with a GPU (the device tool:
# timeout_s 600). Every step is bounded (180 + 260 + 90 s), so it ends
# within 9 minutes:
#  1. builds the plugin against python3's torch with CMake alone (no pip, no
#     GoogleTest, no network);
#  2. runs the CUDA tests: `pytest tests/python -k cuda`;
#  3. runs the GPU benchmark with its bitwise check first (bench_gpu.py
#     --check), the operator against `mask * x`.
#
#   OUT=$OUT scripts/gpu/gpu-check.sh     (PYTHON, BUILD_DIR and COMMIT, the
#                                          commit measured, override)
#
# Into $OUT (else $BUILD_DIR/): gpu-check.log (everything printed),
# build.log, pytest-cuda.txt and bench_gpu.txt / bench_gpu.json (every row,
# the check, the GPU's name, torch, CUDA and the commit). Exit status 0 only
# when the build, the tests and the check passed.
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
BUILD_DIR=${BUILD_DIR:-build-gpu}
mkdir -p "$BUILD_DIR" "${OUT:-$BUILD_DIR}"
out=$(cd "${OUT:-$BUILD_DIR}" && pwd)
# Python imports torch_sparsity from this checkout, and it loads this library.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_SPARSITY_LIBRARY=$PWD/$BUILD_DIR/libtorch_sparsity.so
# nvcc is often outside PATH; CMake finds it through CUDACXX.
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi

step() { printf '%-10s %-8s %5ss\n' "$1" "$([ "$2" = 0 ] && echo ok || echo "FAIL($2)")" "$3"; }

main() {
  echo "== gpu-check: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' || return 1

  echo "== build into $BUILD_DIR"
  local start=$SECONDS build=0 tests=1 bench=1 prefix generator=Ninja summary=()
  command -v ninja >/dev/null 2>&1 || generator="Unix Makefiles"
  prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  timeout -k 10 180 bash -c '
    cmake -S . -B "$1" -G "$2" -DCMAKE_PREFIX_PATH="$3" -DTORCH_SPARSITY_BUILD_TESTS=OFF \
      -DTORCH_SPARSITY_PYTHON="$(command -v "$4")" && cmake --build "$1" -j "$(nproc)"' \
    _ "$BUILD_DIR" "$generator" "$prefix" "$PYTHON" >"$out/build.log" 2>&1 || build=$?
  grep -E "torch-sparsity:|warning" "$out/build.log"
  if [ "$build" = 0 ] && ! grep -q "torch-sparsity: CUDA kernels ON" "$out/build.log"; then
    echo "gpu-check: built without CUDA kernels"
    build=1
  fi
  [ "$build" = 0 ] || tail -30 "$out/build.log"
  summary+=("$(step build "$build" $((SECONDS - start)))")

  if [ "$build" = 0 ]; then
    echo "== CUDA tests"
    start=$SECONDS
    # A module that cannot be imported there fails the step, not the others.
    timeout -k 10 260 "$PYTHON" -m pytest tests/python -k cuda -q -rfEs -p no:cacheprovider \
      --continue-on-collection-errors >"$out/pytest-cuda.txt" 2>&1
    tests=$?
    tail -25 "$out/pytest-cuda.txt"
    summary+=("$(step tests "$tests" $((SECONDS - start))) $(tail -1 "$out/pytest-cuda.txt")")

    echo "== benchmark"
    start=$SECONDS
    timeout -k 10 90 "$PYTHON" scripts/benchmarks/bench_gpu.py --check --runs 100 \
      --out "$out/bench_gpu.txt" --json "$out/bench_gpu.json" ${COMMIT:+--commit "$COMMIT"}
    bench=$?
    summary+=("$(step benchmark "$bench" $((SECONDS - start)))$([ "$bench" != 3 ] || echo " results not bit for bit")")
  fi

  echo "== gpu-check summary (${SECONDS}s in all)"
  printf '%s\n' "${summary[@]}"
  [ "$build" = 0 ] && [ "$tests" = 0 ] && [ "$bench" = 0 ]
}

main 2>&1 | tee "$out/gpu-check.log"
exit "${PIPESTATUS[0]}"
