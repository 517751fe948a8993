#!/usr/bin/env python3
"""Inference cost of live masks: a scripted model whose Linear and Conv2d
weights go through torch.classes.sparsity.FakeSparsity, run under
torch.no_grad(), against the same model with the masks squashed into its
weights (what a pruned model costs once the masks are gone).

Three variants of each model, timed in turns (random order each round, as
scripts/benchmarks/bench_op.py does), as medians per forward; the ratios are medians
over rounds of that round's ratio to the squashed model:

- squashed: plain weights, already multiplied by their masks;
- cached: FakeSparsity with its inference cache (the default);
- uncached: FakeSparsity with set_cache_enabled(False), recomputing mask * w
  for every weight on every forward.

The outputs of all three are checked to be bit for bit equal first.

    .venv/bin/python scripts/benchmarks/bench_cache.py [--repeat 30]
"""

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))
import torch_sparsity  # loads the plugin

from bench_op import interleaved_samples, paired_ratio  # noqa: E402
from sparsity_testing import random_weight_masks, sparsify_with_plugin  # noqa: E402


def mlp(width, depth):
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def models():
    """(name, model, input) triples: weight-bound and compute-bound cases."""
    import torchvision

    yield "MLP 4 x 1024x1024, batch 1", mlp(1024, 4), torch.randn(1, 1024)
    yield "MLP 4 x 1024x1024, batch 64", mlp(1024, 4), torch.randn(64, 1024)
    yield "MLP 8 x 128x128, batch 1", mlp(128, 8), torch.randn(1, 128)
    yield "resnet18, 1 x 3 x 224 x 224", torchvision.models.resnet18(), torch.randn(1, 3, 224, 224)


def squashed(model, masks):
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, mask in masks.items():
            dense.get_submodule(fqn).weight.mul_(mask)
    return torch.jit.script(dense)


def bench(model, x, repeat):
    model.eval()
    masks = random_weight_masks(model)
    dense = squashed(model, masks)
    cached = torch.jit.script(sparsify_with_plugin(copy.deepcopy(model), masks))
    uncached = copy.deepcopy(cached)
    for name, m in uncached.named_modules():
        if hasattr(m, "weight_sparsity"):
            m.weight_sparsity.set_cache_enabled(False)
    variants = {"squashed": dense, "cached": cached, "uncached": uncached}
    with torch.no_grad():
        outputs = {name: m(x) for name, m in variants.items()}
        for name, out in outputs.items():
            assert torch.equal(out, outputs["squashed"]), name
        # Calls per sample: about 20 ms of work.
        start = time.perf_counter()
        dense(x)
        calls = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))

        def run_calls(m):
            for _ in range(calls):
                m(x)

        samples = interleaved_samples({name: (lambda m=m: run_calls(m)) for name, m in variants.items()}, repeat)
        samples = {name: [t / calls for t in s] for name, s in samples.items()}
    hits = sum(m.weight_sparsity.cache_hits() for m in cached.modules() if hasattr(m, "weight_sparsity"))
    assert hits > 0
    med = {name: statistics.median(s) for name, s in samples.items()}
    ratio = {name: paired_ratio(samples[name], samples["squashed"]) for name in ("cached", "uncached")}
    return med, ratio, len(masks)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, torch.no_grad(), medians of "
          f"{args.repeat} interleaved rounds, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
    print("| model | masked weights | squashed ms | cached ms | uncached ms | cached / squashed | uncached / squashed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, model, x in models():
        med, ratio, n = bench(model, x, args.repeat)
        print(f"| {name} | {n} | {med['squashed'] * 1e3:.3f} | {med['cached'] * 1e3:.3f} | "
              f"{med['uncached'] * 1e3:.3f} | {ratio['cached']:.3f} | {ratio['uncached']:.3f} |", flush=True)
    load = os.getloadavg()
    print(f"# load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at end")


if __name__ == "__main__":
    main()
