#!/usr/bin/env bash
# The sanitizer legs. Builds the plugin, sparsity_run and the C++
# tests with sanitizers (CPU only; torch itself stays as shipped) into a
# build folder of their own, then runs them:
#
#   scripts/sanitize.sh address   AddressSanitizer + UndefinedBehaviorSanitizer
#                                 (build-asan/): every C++ test through ctest,
#                                 the concurrency stress test, then the Python
#                                 tests of the operators, classes, module
#                                 utilities and fuzz corpus against the
#                                 sanitized library (libasan preloaded).
#   scripts/sanitize.sh thread    ThreadSanitizer (build-tsan/): the stress
#                                 test, longer, and the C++ class tests.
#
# Any sanitizer report fails the leg (halt_on_error). Environment:
# SPARSITY_STRESS_UPDATES (thread leg: 5000), PYTHON, SANITIZE_PYTEST_ARGS
# (extra pytest arguments). scripts/test.sh runs the address leg.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHON
leg=${1:-address}

case "$leg" in
  address) build_dir=build-asan; sanitizers="address;undefined"; runtime=libasan.so ;;
  thread) build_dir=build-tsan; sanitizers="thread"; runtime=libtsan.so ;;
  *) echo "usage: scripts/sanitize.sh address|thread" >&2; exit 2 ;;
esac

echo "== sanitize ($leg): build into $build_dir"
start=$SECONDS
BUILD_DIR=$build_dir INSTALL=0 scripts/build.sh \
  -DTORCH_SPARSITY_WITH_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "-DTORCH_SPARSITY_SANITIZE=$sanitizers"
echo "== sanitize ($leg): built in $((SECONDS - start)) s"

library=$PWD/$build_dir/libtorch_sparsity.so
# The runtime first, as it must be; libstdc++ with it, for the interceptor of
# __cxa_throw to find the real one (Python itself does not link libstdc++).
preload="$(${CXX:-g++} -print-file-name=$runtime) $(${CXX:-g++} -print-file-name=libstdc++.so.6)"
# No leak check: torch's own allocations at exit are not ours to judge.
# protect_shadow_gap=0: CUDA's libraries (torch is a CUDA build) map memory
# there when they load.
export ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
# Our threads are std::threads; torch's OpenMP pool is not instrumented and
# its synchronization would be invisible to ThreadSanitizer.
export OMP_NUM_THREADS=1

status=0
if [ "$leg" = address ]; then
  echo "== sanitize (address): C++ tests (ctest)"
  start=$SECONDS
  LD_PRELOAD=$preload ctest --test-dir "$build_dir" --output-on-failure -j2 2>&1 | tee "$build_dir/ctest.log" || status=1
  echo "== sanitize (address): ctest took $((SECONDS - start)) s"

  echo "== sanitize (address): Python tests against $library"
  start=$SECONDS
  # Those that exercise the library's code; the packaging, CUDA-build,
  # benchmark and end-to-end model tests build or compile other things.
  LD_PRELOAD=$preload TORCH_SPARSITY_LIBRARY=$library "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/python/test_fake_sparsity_op.py tests/python/test_fake_structured_sparsity.py \
    tests/python/test_fake_sparsity_class.py tests/python/test_fake_sparsity_cache.py \
    tests/python/test_reliability.py tests/python/test_module_utils.py \
    $( [ -f tests/python/test_fuzz.py ] && echo tests/python/test_fuzz.py ) \
    ${SANITIZE_PYTEST_ARGS:-} 2>&1 | tail -n 15 | tee "$build_dir/pytest.log" || status=1
  echo "== sanitize (address): pytest took $((SECONDS - start)) s"
else
  echo "== sanitize (thread): stress test and class tests"
  start=$SECONDS
  SPARSITY_STRESS_UPDATES=${SPARSITY_STRESS_UPDATES:-5000} \
    "$build_dir/tests/cpp/sparsity_stress_tests" 2>&1 | tee "$build_dir/stress.log" || status=1
  "$build_dir/tests/cpp/sparsity_cpp_tests" --gtest_filter='FakeSparsityClass.*:FakeStructuredSparsityClass.*' \
    2>&1 | tail -n 5 || status=1
  echo "== sanitize (thread): took $((SECONDS - start)) s"
fi
if grep -qE "ERROR: (AddressSanitizer|ThreadSanitizer)|WARNING: ThreadSanitizer|runtime error:" \
    "$build_dir"/*.log 2>/dev/null; then
  echo "== sanitize ($leg): sanitizer reports in $build_dir/*.log"
  status=1
fi
echo "== sanitize ($leg): $([ $status = 0 ] && echo clean || echo FAILED)"
exit $status
