#!/usr/bin/env bash
# One command for a GPU lease (device tool, timeout_s 600), its steps in the
# order of what issue 15 needs most, each bounded so that the whole ends by
# SESSION_LIMIT seconds:
#
#   1. the plugin: the libraries of build-gpu-prebuilt/ (scripts/gpu/prebuild.sh,
#      passed with carry) when they were built from these sources against
#      this torch, else built here (the variants in the background);
#   2. scripts/gpu/gpu-check.sh: bench_gpu.py --check (the operator against
#      `mask * x` at 2^26 and 2^28, bit for bit first), then every CUDA test;
#   3. bench_gpu_train.py: a pruned resnet18 training step, eager against
#      scripted, export and export under torch.compile;
#   4. scripts/gpu/gpu-tune.sh: the launch-setting variants, checked and
#      timed while time is left.
#
#   COMMIT=<sha> OUT=$OUT scripts/gpu/gpu-session.sh
#
# COMMIT is the commit measured, for the JSON files (default: the prebuilt
# stamp's). Back in $OUT (the device tool returns at most 8 files):
# bench_gpu.json, bench_gpu_train.json, gpu-tune.json, gpu-session.log (all
# that was printed) and logs.tar.gz (every other log and table, from
# build-gpu/session/). The output ends with the summaries.
#
# SESSION_LIMIT (570): second after which no step starts; TEST_LIMIT (300;
# 60 less when building here) and TRAIN_TIMEOUT (180): seconds. PYTHON,
# TUNE_VARIANTS and RUNS go to the scripts as they are; BENCH_ARGS and
# TRAIN_ARGS add arguments to bench_gpu.py (also in gpu-tune.sh) and
# bench_gpu_train.py ("--device cpu ..." tries this script where no GPU is,
# with TORCH_SPARSITY_CUDA_TESTS_DEVICE=cpu for the tests). Exit status 0
# when every step passed.
set -uo pipefail
cd "$(dirname "$0")/../.."

SESSION_LIMIT=${SESSION_LIMIT:-570}
TEST_LIMIT=${TEST_LIMIT:-300}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-180}
PREBUILT=build-gpu-prebuilt
final_out=${OUT:-}
work=build-gpu/session
rm -rf "$work"
mkdir -p "$work"
work=$(cd "$work" && pwd)
[ -z "$final_out" ] || { mkdir -p "$final_out"; final_out=$(cd "$final_out" && pwd); }
export PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

left() { echo $((SESSION_LIMIT - SECONDS)); }
# The smaller of a step's own limit and the time left (at least 1).
bounded() { local l; l=$(left); [ "$l" -lt "$1" ] || l=$1; [ "$l" -ge 1 ] || l=1; echo "$l"; }

# Copies what must come back to $OUT; run at the end and on an early exit.
deliver() {
  [ -n "$final_out" ] || return 0
  local f
  for f in bench_gpu.json bench_gpu_train.json gpu-tune.json; do
    [ ! -f "$work/$f" ] || cp "$work/$f" "$final_out/"
  done
  tar -C "$work" -czf "$final_out/logs.tar.gz" --exclude=gpu-session.log . 2>/dev/null
  cp "$work/gpu-session.log" "$final_out/" 2>/dev/null
}

main() {
  echo "== gpu-session: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); logs in $work${final_out:+, results to $final_out}"
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "| CUDA", torch.version.cuda)' \
    || { echo "gpu-session: $PYTHON cannot import torch"; return 2; }

  # ---- 1. the libraries
  local torch_version sources stamp_torch stamp_sources use_prebuilt=0 tune_build=""
  torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)')
  sources=$(scripts/gpu/sources-hash.sh)
  if [ -f "$PREBUILT/stamp.txt" ]; then
    stamp_torch=$(sed -n 's/^torch=//p' "$PREBUILT/stamp.txt")
    stamp_sources=$(sed -n 's/^sources=//p' "$PREBUILT/stamp.txt")
    : "${COMMIT:=$(sed -n 's/^commit=//p' "$PREBUILT/stamp.txt")}"
    if [ "$stamp_torch" = "$torch_version" ] && [ "$stamp_sources" = "$sources" ] \
        && TORCH_SPARSITY_LIBRARY=$PWD/$PREBUILT/default/libtorch_sparsity.so "$PYTHON" -c 'import torch_sparsity' 2>"$work/prebuilt-load.txt"; then
      use_prebuilt=1
      echo "== gpu-session: using $PREBUILT ($(tr '\n' ' ' <"$PREBUILT/stamp.txt"))"
      cp "$PREBUILT"/tune-build-*.status "$work/"
    else
      echo "== gpu-session: NOT using $PREBUILT: stamp torch $stamp_torch sources $stamp_sources, here torch" \
        "$torch_version sources $sources; load: $(tail -1 "$work/prebuilt-load.txt" 2>/dev/null)"
    fi
  else
    echo "== gpu-session: no $PREBUILT (scripts/gpu/prebuild.sh); building here"
  fi
  export COMMIT=${COMMIT:-}
  local tune_prefix=build-tune-
  if [ "$use_prebuilt" = 1 ]; then
    tune_prefix=$PREBUILT/
  else
    # The variants build while gpu-check builds and the GPU runs the tests,
    # on the cores they leave idle.
    OUT=$work TUNE_STEPS=build BUILD_PREFIX=$tune_prefix BUILD_TIMEOUT=300 nice -n 19 \
      scripts/gpu/gpu-tune.sh >/dev/null 2>&1 &
    tune_build=$!
  fi

  # ---- 2. benchmark with its check, then the CUDA tests
  local check_status train_status=1 tune_status=1
  if [ "$use_prebuilt" = 1 ]; then
    OUT=$work LIBRARY=$PREBUILT/default/libtorch_sparsity.so TEST_TIMEOUT=$(bounded "$TEST_LIMIT") scripts/gpu/gpu-check.sh
  else
    # The build (up to 200 s) comes first: the tests get less.
    OUT=$work BUILD_TIMEOUT=200 TEST_TIMEOUT=$(bounded $((TEST_LIMIT - 60))) scripts/gpu/gpu-check.sh
  fi
  check_status=$?
  local library=$PWD/$PREBUILT/default/libtorch_sparsity.so
  [ "$use_prebuilt" = 1 ] || library=$PWD/build-gpu/libtorch_sparsity.so

  # ---- 3. training step
  if [ "$(left)" -gt 30 ] && [ -f "$library" ]; then
    echo "== gpu-session: training step benchmark (limit $(bounded "$TRAIN_TIMEOUT")s)"
    # shellcheck disable=SC2086 # TRAIN_ARGS holds separate words
    TORCH_SPARSITY_LIBRARY=$library timeout -k 10 "$(bounded "$TRAIN_TIMEOUT")" "$PYTHON" \
      scripts/benchmarks/bench_gpu_train.py --json "$work/bench_gpu_train.json" --out "$work/bench_gpu_train.txt" \
      ${COMMIT:+--commit "$COMMIT"} ${TRAIN_ARGS:-} 2>&1 | grep -v "^W[0-9]" | tee "$work/bench_gpu_train.log"
    train_status=${PIPESTATUS[0]}
  else
    echo "== gpu-session: no time left (or no library) for the training step benchmark"
  fi

  # ---- 4. the variants
  if [ -n "$tune_build" ]; then
    echo "== gpu-session: waiting for the variants' builds"
    wait "$tune_build"
  fi
  if [ "$(left)" -gt 30 ]; then
    echo "== gpu-session: checking and timing the variants (none starts after another $(left)s)"
    OUT=$work TUNE_STEPS=bench BUILD_PREFIX=$tune_prefix TOTAL_LIMIT=$(left) scripts/gpu/gpu-tune.sh >/dev/null 2>&1
    tune_status=$?
    grep -E "^(== [a-z0-9._-]+ \(|-- |check:)" "$work/gpu-tune.log" || true
  else
    echo "== gpu-session: no time left for the variants"
  fi

  echo
  echo "== gpu-check (status $check_status)"
  sed -n '/^== \(benchmark: copy and fake_sparsity rows\|gpu-check summary\)/,$p' "$work/gpu-check.log"
  echo
  echo "== training step (status $train_status)"
  cat "$work/bench_gpu_train.txt" 2>/dev/null || echo "no table; see bench_gpu_train.log"
  grep "^check " "$work/bench_gpu_train.log" 2>/dev/null || true
  echo
  echo "== gpu-tune (status $tune_status)"
  cat "$work/gpu-tune-table.txt" 2>/dev/null || echo "no tune table; see gpu-tune.log"
  echo "== gpu-session done after ${SECONDS}s (prebuilt libraries: $use_prebuilt)"
  [ "$check_status" -eq 0 ] && [ "$train_status" -eq 0 ] && [ "$tune_status" -eq 0 ]
}

main 2>&1 | tee "$work/gpu-session.log"
status=${PIPESTATUS[0]}
deliver
exit "$status"
