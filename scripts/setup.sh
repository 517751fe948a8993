#!/usr/bin/env bash
# Installs everything torch-sparsity needs on a fresh Debian machine:
# CMake, Ninja and GoogleTest from Debian's packages, and .venv/ with the
# pinned torch, torchvision and test tools. A second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
PY_PACKAGES=(pytest expecttest numpy matplotlib)

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
for name in others:
    importlib.import_module(name)
PY
then
  echo "setup: installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION ${PY_PACKAGES[*]} into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "${PY_PACKAGES[@]}"
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"
