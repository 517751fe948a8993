#!/usr/bin/env bash
# Builds here, before a GPU lease, the plugin libraries the lease runs, so
# that its minutes go to the GPU and not to nvcc: the default build and every
# launch variant of scripts/gpu/gpu-tune.sh, against the GPU machine's own
# torch (its wheel from PyPI, in .venv-gpu/), into build-gpu-prebuilt/:
#
#   build-gpu-prebuilt/<variant>/libtorch_sparsity.so and configure.log
#   build-gpu-prebuilt/tune-build-<variant>.status   (gpu-tune.sh reads these)
#   build-gpu-prebuilt/stamp.txt                     (torch, sources, commit)
#
# scripts/gpu/gpu-session.sh uses them when the stamp's torch is the GPU
# machine's and its sources hash is the checkout's (scripts/gpu/sources-hash.sh),
# else it builds there. Pass the folder to the device tool with
# carry: ["build-gpu-prebuilt"] (about 20 MB).
#
#   scripts/gpu/prebuild.sh       (about 10 minutes on 2 cores)
#
# GPU_TORCH (2.11.0): the GPU machine's torch (/work/.library/device/KINDS.md:
# 2.11.0+cu130, Python 3.12; the library does not depend on Python's
# version). TUNE_VARIANTS goes to gpu-tune.sh as it is.
set -euo pipefail
cd "$(dirname "$0")/../.."

GPU_TORCH=${GPU_TORCH:-2.11.0}
venv=.venv-gpu
prebuilt=build-gpu-prebuilt

if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$GPU_TORCH')" 2>/dev/null; then
  echo "== prebuild: torch $GPU_TORCH into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$GPU_TORCH"
fi
torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
echo "== prebuild: against torch $torch_version"

rm -rf "$prebuilt"
mkdir -p "$prebuilt"
# Each variant builds in its own folder, one compile job each, all at once.
OUT=$prebuilt PYTHON=$venv/bin/python BUILD_PREFIX=$prebuilt/ TUNE_STEPS=build BUILD_TIMEOUT=3600 BUILD_JOBS=1 \
  scripts/gpu/gpu-tune.sh >/dev/null
status=0
for variant_dir in "$prebuilt"/*/; do
  name=$(basename "$variant_dir")
  if [ "$(cat "$prebuilt/tune-build-$name.status" 2>/dev/null)" != 0 ]; then
    echo "prebuild: $name did not build; see $prebuilt/tune-build-$name.log" >&2
    status=1
  fi
  # Only what the GPU session reads travels.
  find "$variant_dir" -mindepth 1 -maxdepth 1 ! -name libtorch_sparsity.so ! -name configure.log -exec rm -rf {} +
done
{
  echo "torch=$torch_version"
  echo "sources=$(scripts/gpu/sources-hash.sh)"
  echo "commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- 2>/dev/null || echo -dirty)"
  echo "built=$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
} >"$prebuilt/stamp.txt"
cat "$prebuilt/stamp.txt"
du -sh "$prebuilt"
exit "$status"
