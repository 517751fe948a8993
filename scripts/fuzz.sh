#!/usr/bin/env bash
# The long fuzz run: every target of tests/fuzz for
# FUZZ_SECONDS (default 600: ten minutes, split evenly between the three
# targets, setup included), after replaying the committed corpus, with a
# fixed seed. Cases known to hit torch's own unpickler limits are run too
# (their crashes and hangs count as torch's findings, not ours).
#
#   scripts/fuzz.sh [SECONDS] [more run_fuzz.py options, e.g. --target set_mask --seed 7]
#
# Findings and logs go to FUZZ_OUT (default: a new folder under /tmp); the
# last lines are the summary. Exits 1 when there is a finding of ours.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

seconds=${1:-${FUZZ_SECONDS:-600}}
[ $# -gt 0 ] && shift
out=${FUZZ_OUT:-$(mktemp -d /tmp/torch-sparsity-fuzz.XXXXXX)}

exec "$PYTHON" tests/fuzz/run_fuzz.py --target all --seed "${FUZZ_SEED:-14}" --seconds "$seconds" \
    --replay-corpus --out "$out" "$@"
