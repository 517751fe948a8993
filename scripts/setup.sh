#!/usr/bin/env bash
# Installs everything torch-sparsity needs on a fresh Debian machine:
# CMake, Ninja and GoogleTest from Debian's packages, .venv/ with the pinned
# torch, torchvision, scikit-build-core and test tools, and this checkout
# into .venv as the editable package torch_sparsity (scripts/build.sh).
# A second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
# pip requirement, then the module that shows it is there.
PY_PACKAGES=(pytest:pytest expecttest:expecttest numpy:numpy matplotlib:matplotlib
  scikit-build-core==1.1.2:scikit_build_core torch-pruning==1.6.1:torch_pruning)

run_as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

debian_packages=(cmake ninja-build g++ libgtest-dev libgmock-dev)
missing=()
for pkg in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  run_as_root apt-get update -qq
  run_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

python_bin=${PYTHON:-python3.11}
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python_bin --version)"
  "$python_bin" -m venv .venv
fi

if ! .venv/bin/python - "$TORCH_VERSION" "$TORCHVISION_VERSION" "${PY_PACKAGES[@]}" <<'PY' 2>/dev/null
import importlib, sys
torch_version, vision_version, *others = sys.argv[1:]
import torch, torchvision
assert torch.__version__.split("+")[0] == torch_version, torch.__version__
assert torchvision.__version__.split("+")[0] == vision_version, torchvision.__version__
import torch.ao.pruning  # the reference implementation the tests compare with
from importlib.metadata import version
for entry in others:
    requirement, module = entry.rsplit(":", 1)
    importlib.import_module(module)
    if "==" in requirement:
        name, pinned = requirement.split("==")
        assert version(name) == pinned, (name, version(name), pinned)
PY
then
  requirements=("${PY_PACKAGES[@]%:*}")
  echo "setup: installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION ${requirements[*]} into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "${requirements[@]}"
fi

# The project itself, once: scripts/test.sh rebuilds and reinstalls it on
# every run. An editable install from this very checkout counts.
if ! .venv/bin/python - "$PWD" <<'PY' 2>/dev/null
import json, sys
from importlib.metadata import distribution
url = json.loads(distribution("torch-sparsity").read_text("direct_url.json"))
assert url["url"] == "file://" + sys.argv[1] and url["dir_info"].get("editable"), url
PY
then
  echo "setup: building and installing torch_sparsity into .venv (editable)"
  scripts/build.sh
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"
