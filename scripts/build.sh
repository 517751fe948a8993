#!/usr/bin/env bash
# Configures and builds the plugin into build/ (BUILD_DIR overrides) against
# the torch of .venv/ (PYTHON overrides). Extra arguments go to cmake;
# BUILD_TARGETS limits what is built.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
build_dir=${BUILD_DIR:-build}
# nvcc is often outside PATH; CMake finds it through CUDACXX.
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
mkdir -p "$build_dir"
torch_prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DTORCH_SPARSITY_PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" "$@" >"$build_dir/configure.log" 2>&1 \
  || { cat "$build_dir/configure.log"; exit 1; }
grep -E "torch-sparsity:" "$build_dir/configure.log" || true
# BUILD_TARGETS (space-separated) builds only those targets.
cmake --build "$build_dir" ${BUILD_TARGETS:+--target $BUILD_TARGETS}
