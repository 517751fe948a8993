#!/usr/bin/env bash
# The end-to-end demo, the README's main-job command. On a fresh machine it
# sets up (scripts/setup.sh), builds and installs the package torch_sparsity
# into .venv (scripts/build.sh), prunes torchvision's resnet18 (random
# weights) to 50% with WeightNormSparsifier, converts it for TorchScript with
# the plugin's FakeSparsity, scripts and saves it (python -m
# torch_sparsity.convert), then
# runs the C++ program installed with the package on it (sparsity_run):
# per-layer sparsity, the largest difference between the C++ output and the
# eager Python output, and inference times of the eager parametrized model,
# the scripted plugin model and the squashed model. The payoff: resnet18
# channel-pruned to 50% with ChannelPruner, shrunk, compiled into an
# AOTInductor package and run from C++, against the dense model's package
# (size, time) and the masked model's output.
#
# Environment: DEMO_DIR (default build/demo), DEMO_THREADS (default 1: one
# thread compares the models rather than the machine's other load),
# DEMO_RUNS (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
demo_dir=${DEMO_DIR:-build/demo}
runs=${DEMO_RUNS:-20}
export OMP_NUM_THREADS=${DEMO_THREADS:-1}

echo "== setup"
scripts/setup.sh
echo "== build and install the package into .venv (incremental)"
scripts/build.sh
sparsity_run=$("$PYTHON" -c 'import torch_sparsity; print(torch_sparsity.sparsity_run_path())')
mkdir -p "$demo_dir"

echo "== Python: prune resnet18 (random weights) to 50% with WeightNormSparsifier, convert, script, save"
"$PYTHON" -W ignore::FutureWarning -m torch_sparsity.convert --model torchvision.models:resnet18 --sparsity 0.5 \
  --output "$demo_dir/resnet18_pruned.pt" --aoti-package "$demo_dir/resnet18_pruned.pt2" --input-shape 1,3,224,224 \
  --save-input "$demo_dir/input.pt" --save-output "$demo_dir/eager_output.pt" --benchmark "$runs" \
  | tee "$demo_dir/python.log"

echo "== C++: $sparsity_run on the saved model"
"$sparsity_run" "$demo_dir/resnet18_pruned.pt" --input "$demo_dir/input.pt" \
  --expect "$demo_dir/eager_output.pt" --atol 1e-5 --runs "$runs" \
  --squash --save "$demo_dir/resnet18_squashed.pt" | tee "$demo_dir/cpp.log"

echo "== C++: $sparsity_run on the AOTInductor package of the same pruned model"
"$sparsity_run" "$demo_dir/resnet18_pruned.pt2" --input "$demo_dir/input.pt" \
  --expect "$demo_dir/eager_output.pt" --atol 1e-4 --runs "$runs" | tee "$demo_dir/aoti.log"
echo "== C++: the package again, with the mask of fc.weight replaced from a file (90% zeros)"
"$PYTHON" -c 'import sys, torch; torch.manual_seed(1); torch.save(torch.rand(1000, 512) > 0.9, sys.argv[1])' \
  "$demo_dir/fc_mask.pt"
"$sparsity_run" "$demo_dir/resnet18_pruned.pt2" --set-mask "fc.weight=$demo_dir/fc_mask.pt" \
  --input "$demo_dir/input.pt" --expect "$demo_dir/eager_output.pt" --runs 1 \
  | grep -E "^set the mask|^  fc.weight|^max" | tee "$demo_dir/aoti_set_mask.log"

echo "== Python: resnet18 unpruned (the seed gives the pruned ones' weights and input), an AOTInductor package of it"
"$PYTHON" -W ignore::FutureWarning -m torch_sparsity.convert --model torchvision.models:resnet18 \
  --output "$demo_dir/resnet18_dense.pt" --aoti-package "$demo_dir/resnet18_dense.pt2" --input-shape 1,3,224,224 \
  --save-input "$demo_dir/dense_input.pt" --save-output "$demo_dir/dense_output.pt" | tee "$demo_dir/dense.log"
echo "== Python: resnet18 channel-pruned to 50% with ChannelPruner, shrunk, an AOTInductor package of it"
"$PYTHON" -W ignore::FutureWarning -m torch_sparsity.convert --model torchvision.models:resnet18 \
  --channel-sparsity 0.5 --shrink --output "$demo_dir/resnet18_shrunk.pt" \
  --aoti-package "$demo_dir/resnet18_shrunk.pt2" --input-shape 1,3,224,224 \
  --save-input "$demo_dir/channel_input.pt" --save-output "$demo_dir/masked_output.pt" | tee "$demo_dir/shrunk.log"
echo "== C++: $sparsity_run on both packages (the shrunk one against the masked model's output)"
"$sparsity_run" "$demo_dir/resnet18_dense.pt2" --input "$demo_dir/dense_input.pt" \
  --expect "$demo_dir/dense_output.pt" --atol 1e-4 --runs "$runs" | tee "$demo_dir/dense_cpp.log"
# The masks left in the shrunk package are all ones (60 of them); only their total is shown.
"$sparsity_run" "$demo_dir/resnet18_shrunk.pt2" --input "$demo_dir/channel_input.pt" \
  --expect "$demo_dir/masked_output.pt" --atol 1e-5 --runs "$runs" | tee "$demo_dir/shrunk_cpp.log" \
  | grep -E "^pruned tensors|all pruned tensors|^output|^max|^median"

# The figures, gathered from the logs.
field() { sed -n "s/$1/\\1/p" "$2" | head -1; }
python_times=$(grep "median inference time" "$demo_dir/python.log")
eager_ms=$(echo "$python_times" | sed -n 's/.*eager parametrized \([0-9.]*\) ms.*/\1/p')
scripted_py_ms=$(echo "$python_times" | sed -n 's/.*scripted with the plugin \([0-9.]*\) ms.*/\1/p')
squashed_py_ms=$(echo "$python_times" | sed -n 's/.*scripted and squashed \([0-9.]*\) ms.*/\1/p')
scripted_cpp_ms=$(field 'median inference time over [0-9]* runs: \([0-9.]*\) ms' "$demo_dir/cpp.log")
squashed_cpp_ms=$(field '.*squashed model:.*median inference time \([0-9.]*\) ms' "$demo_dir/cpp.log")
cpp_diff=$(field 'max |output - expected| = \(.*\)' "$demo_dir/cpp.log")
aoti_diff=$(field 'max |output - expected| = \(.*\)' "$demo_dir/aoti.log")
aoti_ms=$(field 'median inference time over [0-9]* runs: \([0-9.]*\) ms' "$demo_dir/aoti.log")
aoti_set_diff=$(field 'max |output - expected| = \(.*\)' "$demo_dir/aoti_set_mask.log")
overall=$(field '.*all pruned tensors: \(.*\)' "$demo_dir/cpp.log")
mib() { awk -v bytes="$(wc -c <"$1")" 'BEGIN { printf "%.1f", bytes / 2^20 }'; }
dense_mib=$(mib "$demo_dir/resnet18_dense.pt2")
shrunk_mib=$(mib "$demo_dir/resnet18_shrunk.pt2")
dense_ms=$(field 'median inference time over [0-9]* runs: \([0-9.]*\) ms' "$demo_dir/dense_cpp.log")
shrunk_ms=$(field 'median inference time over [0-9]* runs: \([0-9.]*\) ms' "$demo_dir/shrunk_cpp.log")
speedup=$(awk -v a="$dense_ms" -v b="$shrunk_ms" 'BEGIN { printf "%.2f", a / b }')
shrunk_diff=$(field 'max |output - expected| = \(.*\)' "$demo_dir/shrunk_cpp.log")
channels=$(field 'ChannelPruner: \([0-9]* of [0-9]* channels\) masked.*' "$demo_dir/shrunk.log")
macs=$(sed -n 's/^multiply-adds *before *\([0-9,]*\) *after *\([0-9,]*\).*/\1 dense, \2 shrunk/p' "$demo_dir/shrunk.log")
echo
echo "== summary: resnet18, random weights, WeightNormSparsifier 50%, input 1x3x224x224, $OMP_NUM_THREADS thread(s)"
echo "pruned tensors (per layer above): $overall"
echo "max |C++ output - eager Python output|: $cpp_diff (TorchScript), $aoti_diff (AOTInductor package);"
echo "  with fc.weight's mask replaced in the package: $aoti_set_diff (the masks are live)"
echo "median inference time over $runs runs:"
printf '  %-38s %10s ms\n' "eager parametrized model (Python)" "$eager_ms" \
  "scripted plugin model (Python)" "$scripted_py_ms" "scripted plugin model (C++)" "$scripted_cpp_ms" \
  "squashed model (Python)" "$squashed_py_ms" "squashed model (C++)" "$squashed_cpp_ms" \
  "AOTInductor package, masks live (C++)" "$aoti_ms"
echo "ChannelPruner 50% ($channels masked), shrunk; AOTInductor packages run from C++:"
echo "  multiply-adds: $macs"
printf '  %-38s %10s MiB %10s ms\n' "dense package" "$dense_mib" "$dense_ms" \
  "channel-pruned and shrunk package" "$shrunk_mib" "$shrunk_ms"
echo "  speed-up ${speedup}x; max |C++ output of the shrunk package - masked model output|: $shrunk_diff"
echo "files: $demo_dir/resnet18_pruned.pt (masks live), $demo_dir/resnet18_pruned.pt2 (AOTInductor, masks live),"
echo "  $demo_dir/resnet18_squashed.pt (no masks), $demo_dir/resnet18_dense.pt2 (AOTInductor, dense),"
echo "  $demo_dir/resnet18_shrunk.pt2 (AOTInductor, channel-pruned and shrunk)"
