#!/usr/bin/env bash
# Builds the plugin and runs every test: the GoogleTest suite through ctest,
# then pytest, then the AddressSanitizer + UBSan leg (scripts/sanitize.sh
# address: its own build, the C++ tests and a subset of the Python tests
# against the sanitized library; SANITIZE=0 leaves it out). Ends with one
# line that counts them all.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHON

scripts/build.sh

echo "== C++ tests (ctest)"
set +e
ctest --test-dir build --output-on-failure -j2 2>&1 | tee build/ctest.log
cpp_status=${PIPESTATUS[0]}
echo "== Python tests (pytest)"
"$PYTHON" -m pytest tests/python -q -rs -p no:cacheprovider --junitxml=build/pytest.xml "$@"
py_status=$?
sanitize_status=0
sanitize_summary="not run (SANITIZE=0)"
if [ "${SANITIZE:-1}" != 0 ]; then
  echo "== ASan+UBSan leg (scripts/sanitize.sh address)"
  scripts/sanitize.sh address 2>&1 | tee build/sanitize.log
  sanitize_status=${PIPESTATUS[0]}
  sanitize_summary="$(grep -E "tests passed, [0-9]+ tests failed out of" build-asan/ctest.log | tail -1 | sed 's/^[0-9]*% tests passed, //'); \
Python $(grep -E "passed|failed" build-asan/pytest.log | tail -1); $(tail -1 build/sanitize.log | sed 's/^== //')"
fi
set -e

cpp_summary=$(grep -E "tests passed, [0-9]+ tests failed out of" build/ctest.log | tail -1)
[ -n "$cpp_summary" ] || cpp_summary="no ctest summary (GoogleTest missing?)"
py_summary=$("$PYTHON" - <<'PY'
import xml.etree.ElementTree as ET
s = ET.parse("build/pytest.xml").getroot()
s = s if s.tag == "testsuite" else s[0]
n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(f"{n - f - e - k} passed, {f + e} failed, {k} skipped of {n}")
PY
)
echo "== summary: C++: $cpp_summary | Python: $py_summary | ASan+UBSan: $sanitize_summary"
[ "$cpp_status" -eq 0 ] && [ "$py_status" -eq 0 ] && [ "$sanitize_status" -eq 0 ]
