#!/usr/bin/env bash
# Builds the plugin and runs every test: the GoogleTest suite through ctest,
# then pytest. Ends with one line that counts both.
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
echo "== summary: C++: $cpp_summary | Python: $py_summary"
[ "$cpp_status" -eq 0 ] && [ "$py_status" -eq 0 ]
