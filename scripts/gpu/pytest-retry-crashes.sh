#!/usr/bin/env bash
# Runs pytest so that a test that kills the interpreter (a segfault in a
# kernel, an abort) does not hide the tests after it. pytest runs verbosely,
# so each test's node id is printed when it starts (and pytest's faulthandler
# prints the stack on a fatal signal). When pytest dies from a signal, the
# test that was running is recorded as crashed and pytest runs again on the
# tests that have not run yet, up to --max-crashes times, all within --limit
# seconds. The summary names every test that failed, errored, crashed, timed
# out or did not run.
#
#   scripts/gpu/pytest-retry-crashes.sh [--limit S] [--out PREFIX] [--max-crashes N]
#                                   [--summary FILE] [--] TEST_PATH...
#
#   --limit S        seconds for all pytest runs together, the listing of
#                    tests never reached included (default 180; 5 more for a
#                    run that must be killed)
#   --out PREFIX     PREFIX.txt: the output of every run; PREFIX-results.txt:
#                    one "STATUS node-id" line per test (default
#                    build/pytest-retry)
#   --max-crashes N  crashes after which the tests left are not run (default 3)
#   --summary FILE   also write the one-line summary to FILE
#
# Paths are relative to the repository root, which is pytest's rootdir here,
# so node ids printed by one run can be passed to the next. PYTHON picks the
# interpreter (default python3). Exit status 0 only when every test ran and
# none failed, errored, crashed or timed out (skips are fine).
# Known limit: node ids that contain spaces are not recognised.
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
limit=180
prefix=build/pytest-retry
max_crashes=3
summary_file=""
while [ $# -gt 0 ]; do
  case "$1" in
    --limit) limit=$2; shift 2 ;;
    --out) prefix=$2; shift 2 ;;
    --max-crashes) max_crashes=$2; shift 2 ;;
    --summary) summary_file=$2; shift 2 ;;
    --) shift; break ;;
    -*) echo "pytest-retry-crashes.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "pytest-retry-crashes.sh: no test path given" >&2
  exit 2
fi
paths=("$@")
# A run is not started with less than this many seconds left.
min_run_s=${MIN_RUN_S:-15}
# Seconds kept back from the runs for listing the tests never reached.
reserve_s=${RESERVE_S:-15}

mkdir -p "$(dirname "$prefix")"
log=$prefix.txt
results_file=$prefix-results.txt
: >"$log"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# -v prints "node-id " before a test runs and the outcome word after it.
# faulthandler_timeout dumps the stacks of a test that runs over 90 s (a
# hang) without stopping it. --rootdir makes node ids repository-relative.
pytest_options=(-v -rsfE -p no:cacheprovider --rootdir "$PWD" -o faulthandler_timeout=90)

declare -A status_of=()   # node id -> PASSED, FAILED, ERROR, SKIPPED, XFAIL, XPASS, CRASHED(SIG...), TIMEOUT, NOT-RUN
order=()                  # node ids in the order first seen
notes=()
deadline=$((SECONDS + limit))           # everything, the final listing included
run_deadline=$((deadline - reserve_s))  # the pytest runs

set_status() { # node-id status: the worse outcome wins (a teardown ERROR after PASSED)
  local id=$1 new=$2 old=${status_of[$1]:-}
  if [ -z "$old" ]; then
    order+=("$id")
    status_of[$id]=$new
  elif [ "$old" = PASSED ] || [ "$old" = SKIPPED ] || [ "$old" = XFAIL ]; then
    status_of[$id]=$new
  fi
}

# Reads one run's output: records each outcome and prints the id of the last
# test that was started (the one running when the run ended), or nothing.
parse_run() {
  local file=$1 line id word last=""
  while IFS= read -r line || [ -n "$line" ]; do
    [[ $line =~ ^([^[:space:]]+::[^[:space:]]+)([[:space:]]+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)([[:space:]]|$))? ]] || continue
    id=${BASH_REMATCH[1]}
    word=${BASH_REMATCH[3]}
    last=$id
    if [ -n "$word" ]; then set_status "$id" "$word"; fi
  done <"$file"
  printf '%s' "$last"
}

# Node ids of every test under paths, one per line, in run order; at most
# $1 seconds.
collect() {
  local left=$1
  [ "$left" -ge 5 ] || return 1
  timeout -k 5 "$left" "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider --rootdir "$PWD" \
    "${paths[@]}" >"$work/collected.txt" 2>&1
  local rc=$?
  grep -E '^[^[:space:]]+::[^[:space:]]+$' "$work/collected.txt" || true
  return $rc
}

targets=("${paths[@]}")
run=0 crashes=0 finished=0
while :; do
  run=$((run + 1))
  left=$((run_deadline - SECONDS))
  if [ "$left" -lt "$min_run_s" ]; then
    notes+=("no time left for pytest run $run (${left}s of ${limit}s)")
    break
  fi
  echo "== pytest run $run: ${#targets[@]} target(s), limit ${left}s" | tee -a "$log"
  start=$SECONDS
  PYTHONUNBUFFERED=1 timeout -k 5 "$left" "$PYTHON" -m pytest "${pytest_options[@]}" "${targets[@]}" 2>&1 \
    | tee -a "$log" "$work/run.txt"
  rc=${PIPESTATUS[0]}
  elapsed=$((SECONDS - start))
  # A run cut short leaves its last line ("node-id ") without a newline.
  if [ -n "$(tail -c 1 "$work/run.txt")" ]; then echo | tee -a "$log"; fi
  : >"$work/last.txt"
  parse_run "$work/run.txt" >"$work/last.txt"
  running=$(cat "$work/last.txt")
  : >"$work/run.txt"
  echo "== pytest run $run ended with status $rc after ${elapsed}s" | tee -a "$log"

  if [ "$rc" -eq 0 ] || [ "$rc" -eq 1 ]; then
    finished=1 # every target ran (1: some failed)
    break
  fi
  if [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$elapsed" -ge "$left" ]; }; then
    if [ -n "$running" ] && [ -z "${status_of[$running]:-}" ]; then
      set_status "$running" TIMEOUT
    fi
    notes+=("pytest run $run stopped at the ${limit}s limit${running:+ while running $running}")
    break
  fi
  if [ "$rc" -le 128 ]; then
    # 2 interrupted, 3 internal error, 4 usage error, 5 no tests collected
    notes+=("pytest run $run exited with status $rc (not a test outcome: see $log)")
    break
  fi

  signal=$(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128)))
  crashes=$((crashes + 1))
  if [ -z "$running" ]; then
    notes+=("pytest run $run died from SIG$signal before any test started (collection or import)")
    break
  fi
  if [ -n "${status_of[$running]:-}" ]; then
    # Its outcome line was printed: the crash came after (its teardown).
    notes+=("SIG$signal after $running reported ${status_of[$running]} (in its teardown?)")
    status_of[$running]="CRASHED(SIG$signal)"
  else
    set_status "$running" "CRASHED(SIG$signal)"
  fi
  echo "== $running crashed (SIG$signal)" | tee -a "$log"

  # The tests that have not run yet, in collection order, without the crashed one.
  if ! collect $((run_deadline - SECONDS)) >"$work/all.txt"; then
    notes+=("could not list the tests after the crash: $(tail -1 "$work/collected.txt")")
    break
  fi
  targets=()
  while IFS= read -r id; do
    [ -n "${status_of[$id]:-}" ] || targets+=("$id")
  done <"$work/all.txt"
  [ "${#targets[@]}" -gt 0 ] || { finished=1; break; }
  if [ "$crashes" -ge "$max_crashes" ]; then
    notes+=("stopped after $crashes crash(es): the ${#targets[@]} tests left were not run")
    break
  fi
  echo "== rerunning the ${#targets[@]} tests not run yet, without $running" | tee -a "$log"
done

# Tests never reached (time, crashes): known only when they were listed.
if [ "$finished" -eq 0 ]; then
  if [ ! -s "$work/all.txt" ]; then collect $((deadline - SECONDS)) >"$work/all.txt"; fi
  while IFS= read -r id; do
    [ -n "${status_of[$id]:-}" ] || set_status "$id" NOT-RUN
  done <"$work/all.txt"
fi

: >"$results_file"
declare -A count=()
for id in "${order[@]}"; do
  s=${status_of[$id]}
  printf '%s %s\n' "$s" "$id" >>"$results_file"
  key=${s%%(*}
  count[$key]=$((${count[$key]:-0} + 1))
done
summary=""
for key in PASSED FAILED ERROR CRASHED TIMEOUT NOT-RUN SKIPPED XFAIL XPASS; do
  n=${count[$key]:-0}
  if [ "$n" -gt 0 ] || [ "$key" = PASSED ]; then
    case "$key" in
      NOT-RUN) word="not run" ;;
      TIMEOUT) word="timed out" ;;
      ERROR) word=error; [ "$n" -eq 1 ] || word=errors ;;
      *) word=$(echo "$key" | tr '[:upper:]' '[:lower:]') ;;
    esac
    summary+="${summary:+, }$n $word"
  fi
done
summary+=" (${#order[@]} tests, $run pytest run(s))"
bad=$((${count[FAILED]:-0} + ${count[ERROR]:-0} + ${count[CRASHED]:-0} + ${count[TIMEOUT]:-0} + ${count[NOT-RUN]:-0}))

{
  echo "== pytest summary: $summary"
  for note in "${notes[@]}"; do echo "   note: $note"; done
  for id in "${order[@]}"; do
    case "${status_of[$id]}" in
      PASSED | SKIPPED | XFAIL | XPASS) ;;
      *) printf '   %-16s %s\n' "${status_of[$id]}" "$id" ;;
    esac
  done
} | tee -a "$log"
if [ -n "$summary_file" ]; then echo "$summary" >"$summary_file"; fi

[ "$finished" -eq 1 ] && [ "$bad" -eq 0 ] && [ "${#order[@]}" -gt 0 ]
