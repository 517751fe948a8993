#!/usr/bin/env bash
# Prints a hash of the files the plugin library is built from (C++, CUDA,
# CMake), so that a library built on one machine (scripts/gpu/prebuild.sh)
# is used on the GPU machine only when it was built from the same files.
# Needs no git: the GPU machine gets a copy of the working tree without it.
set -euo pipefail
cd "$(dirname "$0")/../.."
find ops classes aoti tools cmake CMakeLists.txt -type f \
  \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.cmake' -o -name '*.in' \
  -o -name CMakeLists.txt \) -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-32
