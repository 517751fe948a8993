#!/usr/bin/env bash
# For a machine with a GPU: compares launch settings of the CUDA flat (dense)
# kernel. Builds only the plugin library for a few variants of the
# TORCH_SPARSITY_CUDA_* settings (CMakeLists.txt), in parallel, one build
# directory each; then runs scripts/benchmarks/bench_gpu.py --check against each variant
# (one process per variant, one after the other) and prints one table:
# variant, mask dtype, size, GB/s, share of copy bandwidth, speed against
# `mask * x` with a float32 mask and with the same mask, and whether the
# variant's results were bit-exact (a fast but wrong variant shows WRONG).
# Every step is bounded by `timeout`; the whole run stays under 5 minutes.
#
#   scripts/gpu/gpu-tune.sh
#
# Environment (all optional):
#   PYTHON         interpreter with torch (python3)
#   TUNE_VARIANTS  "name SETTING=value ...; name2 ..." replaces the list below;
#                  SETTING is FLAT_THREADS, FLAT_UNROLL, FLAT_GRID_WAVES,
#                  FLAT_MIN_BLOCKS, BYTE_MASK_VEC or BYTE_MASK_UNROLL; the
#                  others keep their defaults
#   BUILD_PREFIX   build directories are ${BUILD_PREFIX}<name> (build-tune-)
#   BUILD_TIMEOUT  seconds for all builds together (150)
#   BUILD_JOBS     compile jobs per build (the cores shared among the builds)
#   BENCH_TIMEOUT  seconds per variant's check and benchmark (25)
#   TOTAL_LIMIT    seconds after which no further benchmark starts (270)
#   RUNS           timed runs per case (100)
#   BENCH_ARGS     more bench_gpu.py arguments; "--device cpu --sizes 20"
#                  tries this script without a GPU
#   TUNE_STEPS     all (build, then check and benchmark), build, or bench
#                  (the variants built by an earlier "build" run, whose
#                  statuses it reads from the results folder); split, the
#                  builds can run while the GPU does other work
#                  (scripts/gpu/gpu-session.sh)
# Results: gpu-tune.log (everything; gpu-tune-build.log for TUNE_STEPS=build),
# tune-build-<name>.log and .status (each build), gpu-tune-table.txt (the
# table) and gpu-tune.json (settings, statuses, check and rows of every
# variant) in $OUT when it is set, else in ${BUILD_PREFIX}results/. Exit
# status 0 when every variant built, checked bit-exact and ran its benchmark
# (for TUNE_STEPS=build: when every variant built).
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
# The GPU machine has no scikit-build-core and no network: the plugin is
# built with CMake alone (INSTALL=0), Python imports torch_sparsity from this
# checkout and loads the library named by TORCH_SPARSITY_LIBRARY.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
BUILD_PREFIX=${BUILD_PREFIX:-build-tune-}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-25}
TOTAL_LIMIT=${TOTAL_LIMIT:-270}
RUNS=${RUNS:-100}
BENCH_ARGS=${BENCH_ARGS:-}
TUNE_STEPS=${TUNE_STEPS:-all}
case "$TUNE_STEPS" in
  all | build | bench) ;;
  *) echo "gpu-tune: TUNE_STEPS is all, build or bench, not '$TUNE_STEPS'" >&2; exit 2 ;;
esac

# name, then the settings that differ from the defaults (FLAT_THREADS=256
# FLAT_UNROLL=4 FLAT_GRID_WAVES=1 FLAT_MIN_BLOCKS=0 BYTE_MASK_VEC=0
# BYTE_MASK_UNROLL=0):
#  default      as shipped
#  mask16       bool/uint8 masks: 16 mask bytes in one load, x and out in
#               four 16-byte accesses (float32), one pack per round
#  unroll2      two packs per round on both paths (8 float32 elements per
#               thread with a float mask, 32 with a bool/uint8 mask)
#  mask16-nocap the same as mask16 with an uncapped grid (one block per chunk)
#  occupancy    the defaults, with registers limited so that 8 blocks of 256
#               fit an SM (by default the float32 kernel takes 60 registers,
#               4 blocks fit, and the one-wave grid cap runs as two waves;
#               with a bool mask 48 registers, 5 blocks, 1.6 waves); the
#               kernels with bfloat16 operands spill then (ptxas warns)
#  t128-nocap   PyTorch's own elementwise shape: 128 threads, 8 float32
#               elements per thread (2 packs of 4), uncapped grid; mask16 for
#               1-byte masks
DEFAULT_VARIANTS="default;
mask16 BYTE_MASK_VEC=16 BYTE_MASK_UNROLL=1;
unroll2 FLAT_UNROLL=2 BYTE_MASK_VEC=16 BYTE_MASK_UNROLL=2;
mask16-nocap BYTE_MASK_VEC=16 BYTE_MASK_UNROLL=1 FLAT_GRID_WAVES=0;
occupancy FLAT_MIN_BLOCKS=8;
t128-nocap FLAT_THREADS=128 FLAT_UNROLL=2 FLAT_GRID_WAVES=0 BYTE_MASK_VEC=16 BYTE_MASK_UNROLL=1"
SETTINGS=(FLAT_THREADS FLAT_UNROLL FLAT_GRID_WAVES FLAT_MIN_BLOCKS BYTE_MASK_VEC BYTE_MASK_UNROLL)
declare -A SETTING_DEFAULT=([FLAT_THREADS]=256 [FLAT_UNROLL]=4 [FLAT_GRID_WAVES]=1 [FLAT_MIN_BLOCKS]=0 [BYTE_MASK_VEC]=0 [BYTE_MASK_UNROLL]=0)

results=${OUT:-${BUILD_PREFIX}results}
case "$BUILD_PREFIX" in
  /*) prefix_path=$BUILD_PREFIX ;;
  *) prefix_path=$PWD/$BUILD_PREFIX ;;
esac
mkdir -p "$results"
results=$(cd "$results" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

names=()
declare -A cmake_args=() settings_of=()
# Parses TUNE_VARIANTS (or the default list) into names, cmake_args (every
# setting given explicitly, so a reused build directory cannot keep an old
# value) and settings_of (a readable summary).
parse_variants() {
  local spec entry name word key value entries words
  spec=${TUNE_VARIANTS:-$DEFAULT_VARIANTS}
  IFS=';' read -r -a entries <<<"${spec//$'\n'/ }"
  for entry in "${entries[@]}"; do
    read -r -a words <<<"$entry"
    [ "${#words[@]}" -gt 0 ] || continue
    name=${words[0]}
    if ! [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || [ -n "${cmake_args[$name]+x}" ]; then
      echo "gpu-tune: bad or repeated variant name '$name'" >&2
      return 1
    fi
    declare -A chosen=()
    for word in "${words[@]:1}"; do
      key=${word%%=*} value=${word#*=}
      if [ -z "${SETTING_DEFAULT[$key]+x}" ] || ! [[ $value =~ ^[0-9]+$ ]]; then
        echo "gpu-tune: variant $name: '$word' is not SETTING=number (settings: ${SETTINGS[*]})" >&2
        return 1
      fi
      chosen[$key]=$value
    done
    local args="" summary=""
    for key in "${SETTINGS[@]}"; do
      value=${chosen[$key]:-${SETTING_DEFAULT[$key]}}
      args+=" -DTORCH_SPARSITY_CUDA_$key=$value"
      if [ -n "${chosen[$key]:-}" ]; then summary+="${summary:+ }$key=$value"; fi
    done
    unset chosen
    names+=("$name")
    cmake_args[$name]=$args
    settings_of[$name]=${summary:-defaults}
  done
  [ "${#names[@]}" -gt 0 ] || { echo "gpu-tune: no variants" >&2; return 1; }
}

main() {
  echo "== gpu-tune ($TUNE_STEPS): $(date -u '+%Y-%m-%d %H:%M:%S UTC'), results in $results"
  parse_variants || return 2
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  fi
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
      "| CUDA", torch.version.cuda, "| GPU available:", torch.cuda.is_available())' \
    || { echo "gpu-tune: $PYTHON cannot import torch"; return 2; }
  local name
  for name in "${names[@]}"; do
    printf '   variant %-14s %s\n' "$name" "${settings_of[$name]}"
  done

  case "$TUNE_STEPS" in
    build) build_variants ;;
    bench) bench_variants ;;
    *) build_variants; bench_variants ;;
  esac
}

# Builds every variant in parallel; each one's log and exit status go to the
# results folder (tune-build-<name>.log, .status).
build_variants() {
  local name cores jobs start=$SECONDS
  cores=$(nproc 2>/dev/null || echo 4)
  jobs=${BUILD_JOBS:-$(((cores + ${#names[@]} - 1) / ${#names[@]}))}
  echo "== building ${#names[@]} variants in parallel, $jobs jobs each (limit ${BUILD_TIMEOUT}s)"
  for name in "${names[@]}"; do
    rm -f "$results/tune-build-$name.status"
    (
      # shellcheck disable=SC2086 # cmake_args holds separate -D words
      CMAKE_BUILD_PARALLEL_LEVEL=$jobs PYTHON=$PYTHON BUILD_DIR=$BUILD_PREFIX$name BUILD_TARGETS=torch_sparsity INSTALL=0 \
        timeout -k 10 "$BUILD_TIMEOUT" scripts/build.sh -DTORCH_SPARSITY_BUILD_TESTS=OFF ${cmake_args[$name]} \
        >"$results/tune-build-$name.log" 2>&1
      echo $? >"$results/tune-build-$name.status"
    ) &
  done
  wait
  local failed=0 status
  for name in "${names[@]}"; do
    status=$(build_status_of "$name")
    if [ "$status" -ne 0 ]; then
      failed=1
      echo "-- build of $name failed (status $status); its log ends:"
      tail -25 "$results/tune-build-$name.log"
    elif grep -q "warning" "$results/tune-build-$name.log"; then
      echo "-- build of $name has warnings:"
      grep -A3 "warning" "$results/tune-build-$name.log" | head -20
    fi
  done
  echo "== builds done after $((SECONDS - start))s"
  return "$failed"
}

# A variant's build status: its build's exit status, 1 when the library is
# missing or the build never ran.
build_status_of() {
  local status
  status=$(cat "$results/tune-build-$1.status" 2>/dev/null || echo 1)
  if [ "$status" -eq 0 ] && [ ! -f "$prefix_path$1/libtorch_sparsity.so" ]; then status=1; fi
  echo "$status"
}

# Checks and benchmarks every variant that built (one process each, one
# after the other, none started after TOTAL_LIMIT), then prints the table.
bench_variants() {
  local name left status
  declare -A build_status=() bench_status=()
  for name in "${names[@]}"; do
    build_status[$name]=$(build_status_of "$name")
  done
  for name in "${names[@]}"; do
    bench_status[$name]=skipped
    [ "${build_status[$name]}" -eq 0 ] || continue
    left=$((TOTAL_LIMIT - SECONDS))
    if [ "$left" -lt 10 ]; then
      echo "-- no time left to benchmark $name"
      continue
    fi
    [ "$left" -lt "$BENCH_TIMEOUT" ] || left=$BENCH_TIMEOUT
    echo "== $name (${settings_of[$name]}): check and benchmark (limit ${left}s)"
    # shellcheck disable=SC2086 # BENCH_ARGS holds separate words
    TORCH_SPARSITY_LIBRARY=$prefix_path$name/libtorch_sparsity.so timeout -k 5 "$left" \
      "$PYTHON" scripts/benchmarks/bench_gpu.py --check --runs "$RUNS" --json "$work/bench-$name.json" $BENCH_ARGS
    status=$?
    bench_status[$name]=$status
    echo "-- $name: bench_gpu.py status $status"
  done

  # ---- the table
  for name in "${names[@]}"; do
    printf '%s\t%s\t%s\t%s\n' "$name" "${settings_of[$name]}" "${build_status[$name]}" "${bench_status[$name]}"
  done >"$work/variants.tsv"
  "$PYTHON" - "$work" "$results" <<'PY'
import json
import sys
from pathlib import Path

work, results = Path(sys.argv[1]), Path(sys.argv[2])
variants = []
for line in (work / "variants.tsv").read_text().splitlines():
    name, settings, build, bench = line.split("\t")
    path = work / f"bench-{name}.json"
    report = json.loads(path.read_text()) if path.exists() else None
    variants.append({"name": name, "settings": settings, "build_status": build, "bench_status": bench, "report": report})

def verdict(v):
    if v["build_status"] != "0":
        return "BUILD FAILED"
    report = v["report"]
    if report is None:
        return f"NO RESULT (status {v['bench_status']})"
    if report["check"] is None:
        return "unchecked"
    if not report["check"]["ok"]:
        return f"WRONG ({len(report['check']['failures'])} of {report['check']['cases']})"
    return "ok" if v["bench_status"] == "0" else f"ok, status {v['bench_status']}"

lines = []
first = variants[0]["name"]
head = (
    f"{'variant':<14} {'mask':<8} {'elements':>8} {'GB/s':>8} {'of copy':>8} {'vs float*x':>10} "
    f"{'vs mask*x':>10} {'vs ' + first:>12}  check"
)
lines.append("fake_sparsity, float32 x; vs float*x: time of mask * x with a float32 mask / time;")
lines.append("vs mask*x: the same with this row's mask; vs " + first + ": this GB/s / that variant's GB/s;")
lines.append("'*': fastest correct variant of its group")
lines.append(head)
lines.append("-" * len(head))
groups = {}
for v in variants:
    for row in (v["report"] or {}).get("rows", []):
        if row["case"] == "fake_sparsity":
            groups.setdefault((row["mask"], row["elements"]), []).append((v, row))
for (mask, elements), members in groups.items():
    correct = [row["gbps"] for v, row in members if verdict(v).startswith("ok")]
    best = max(correct) if correct else None
    base = next((row["gbps"] for v, row in members if v["name"] == first), None)
    for v, row in members:
        star = "*" if best is not None and row["gbps"] == best and verdict(v).startswith("ok") else " "
        vs_first = f"{row['gbps'] / base:12.3f}" if base else f"{'':>12}"
        lines.append(
            f"{v['name']:<14} {mask:<8} {'2^%d' % (elements.bit_length() - 1):>8} {row['gbps']:8.1f} "
            f"{100 * row['of_copy']:7.1f}% {row['vs_float_mask']:10.2f} {row['vs_same_mask']:10.2f} {vs_first} "
            f"{star} {verdict(v)}"
        )
    lines.append("")
for v in variants:
    if not any(v is member for members in groups.values() for member, _ in members):
        lines.append(f"{v['name']:<14} no rows: {verdict(v)}")
lines.append("variants:")
for v in variants:
    lines.append(f"  {v['name']:<14} {v['settings']}")
    for failure in ((v["report"] or {}).get("check") or {}).get("failures", [])[:5]:
        lines.append(f"  {'':<14} WRONG: {failure}")
table = "\n".join(lines)
print(table)
(results / "gpu-tune-table.txt").write_text(table + "\n")
(results / "gpu-tune.json").write_text(json.dumps(variants, indent=1) + "\n")
PY

  echo "== gpu-tune done after ${SECONDS}s"
  for name in "${names[@]}"; do
    [ "${build_status[$name]}" -eq 0 ] && [ "${bench_status[$name]}" = 0 ] || return 1
  done
}

log=gpu-tune.log
[ "$TUNE_STEPS" != build ] || log=gpu-tune-build.log
main 2>&1 | tee "$results/$log"
exit "${PIPESTATUS[0]}"
