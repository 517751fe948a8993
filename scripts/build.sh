#!/usr/bin/env bash
# Builds the plugin into build/ (BUILD_DIR overrides) against the torch of
# .venv/ (PYTHON overrides), C++ tests included, and installs the package
# torch_sparsity into that Python in editable mode: pip and scikit-build-core
# drive CMake with build/ as the build folder, the Python files stay those of
# the checkout, and the library, headers, CMake package and sparsity_run are
# copied into site-packages/torch_sparsity. Rerun it after a C++ change.
#
# INSTALL=0 only runs CMake (no pip, no scikit-build-core needed). Extra
# arguments go to cmake; BUILD_TARGETS (space-separated) limits what is built
# and implies INSTALL=0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
build_dir=${BUILD_DIR:-build}
install=${INSTALL:-1}
[ -z "${BUILD_TARGETS:-}" ] || install=0
# nvcc is often outside PATH; CMake finds it through CUDACXX.
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
mkdir -p "$build_dir"
python_path="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"

if [ "$install" = 1 ]; then
  if ! "$PYTHON" -c 'import scikit_build_core' 2>/dev/null; then
    echo "build.sh: $PYTHON has no scikit-build-core (scripts/setup.sh installs it); INSTALL=0 builds without installing" >&2
    exit 1
  fi
  cmake_args="-DTORCH_SPARSITY_PYTHON=$python_path"
  for arg in "$@"; do cmake_args+=";$arg"; done
  # The log keeps CMake's own output; the "torch-sparsity:" lines are shown.
  if ! "$PYTHON" -m pip install -v --no-build-isolation --no-deps --editable . \
      -C build-dir="$build_dir" -C editable.rebuild=false -C build.verbose=true \
      -C cmake.define.TORCH_SPARSITY_BUILD_TESTS=ON -C cmake.args="$cmake_args" \
      >"$build_dir/install.log" 2>&1; then
    cat "$build_dir/install.log"
    exit 1
  fi
  grep -E "torch-sparsity:|warning|Successfully installed" "$build_dir/install.log" || true
  exit 0
fi

torch_prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DTORCH_SPARSITY_PYTHON="$python_path" "$@" >"$build_dir/configure.log" 2>&1 \
  || { cat "$build_dir/configure.log"; exit 1; }
grep -E "torch-sparsity:" "$build_dir/configure.log" || true
cmake --build "$build_dir" ${BUILD_TARGETS:+--target $BUILD_TARGETS}
