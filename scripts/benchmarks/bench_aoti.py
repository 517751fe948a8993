"""CPU inference of pruned torchvision models as AOTInductor packages.

For each model (random weights, every Linear/Conv weight pruned to 50% with
WeightNormSparsifier) and batch size, times in one run, interleaved round by
round so that the machine's drift hits every variant alike:

- the AOTInductor package of the pruned model, masks live, folded
  (torch_sparsity.aoti.compile's default: the masked weights computed at
  load and after each set_mask);
- the same with fold_masks=False (fake_sparsity on every forward);
- the AOTInductor package of the squashed (dense) model;
- the TorchScript plugin model (convert, torch.jit.script; its FakeSparsity
  cache answers while nothing changes);
- the eager model with torch.ao.pruning's parametrization.

It also reports compile times, the largest difference of each output from
the eager model's, and that after set_mask the first run of the package
equals the eager model with the same mask. Ratios are medians of per-round
ratios.

    .venv/bin/python scripts/benchmarks/bench_aoti.py [--models resnet18,mobilenet_v3_small,vit_b_16]
        [--batches 1,32] [--rounds 15] [--threads 2] [--out bench-results/aoti.md]
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import torch_sparsity  # loads the plugin
from torch_sparsity import aoti
from torch_sparsity.convert import convert, squash

# The tests' pruned models: random weights made lively (torchvision zeroes
# vit_b_16's head and leaves mobilenet's outputs near 1e-12, which would make
# every output comparison vacuous).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))
from end_to_end_models import pruned_model  # noqa: E402

IMAGE = 224


def median_ms(samples):
    return 1000 * statistics.median(samples)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name, batch, rounds, folder):
    model, _ = pruned_model(name, "weight_norm")
    x = torch.randn(batch, 3, IMAGE, IMAGE)
    exportable = convert(model, target="export")
    dense = squash(copy.deepcopy(exportable))
    with torch.no_grad():
        expected = model(x)

    start = time.perf_counter()
    pruned_runner = aoti.load(aoti.compile(exportable, (x,), folder / f"{name}_{batch}_pruned.pt2"))
    pruned_compile = time.perf_counter() - start
    operator_runner = aoti.load(
        aoti.compile(exportable, (x,), folder / f"{name}_{batch}_operator.pt2", fold_masks=False)
    )
    start = time.perf_counter()
    dense_path = torch._inductor.aoti_compile_and_package(
        torch.export.export(dense, (x,)), package_path=str(folder / f"{name}_{batch}_dense.pt2")
    )
    dense_runner = torch._inductor.aoti_load_package(dense_path)
    dense_compile = time.perf_counter() - start
    scripted = torch.jit.script(convert(model))

    variants = {
        "package, masks live": lambda: pruned_runner(x),
        "package, operator": lambda: operator_runner(x),
        "package, squashed": lambda: dense_runner(x),
        "TorchScript plugin": lambda: scripted(x),
        "eager (torch.ao.pruning)": lambda: model(x),
    }
    samples = {v: [] for v in variants}
    diffs = {}
    with torch.no_grad():
        for v, fn in variants.items():  # warm-up, and the outputs
            fn()
            diffs[v] = (fn() - expected).abs().max().item() / expected.abs().max().item()
        for _ in range(rounds):
            for v, fn in variants.items():
                samples[v].append(timed(fn))

        # A new mask for the last matrix: the next run must follow it.
        fqn = [f for f in pruned_runner.mask_names() if pruned_runner.mask(f).dim() >= 2][-1]
        new_mask = torch.rand(pruned_runner.mask(fqn).shape) > 0.9
        torch_sparsity.masks(exportable)[fqn].copy_(new_mask)
        expected_new = exportable(x)
        pruned_runner.set_mask(fqn, new_mask)
        start = time.perf_counter()
        after = pruned_runner(x)  # folds the masked weights again
        first_run = time.perf_counter() - start
        set_mask_diff = (after - expected_new).abs().max().item() / expected_new.abs().max().item()
        moved = (expected_new - expected).abs().max().item() / expected.abs().max().item()

    ratio = statistics.median(p / d for p, d in zip(samples["package, masks live"], samples["package, squashed"]))
    return {
        "ms": {v: median_ms(s) for v, s in samples.items()},
        "ratio": ratio,
        "diffs": diffs,
        "compile": (pruned_compile, dense_compile),
        "set_mask_diff": set_mask_diff,
        "first_run_ms": 1000 * first_run,
        "moved": moved,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small,vit_b_16")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    warnings.simplefilter("ignore", FutureWarning)
    torch.set_num_threads(args.threads)
    header = (
        "| model | batch | package, masks live ms | package, operator ms | package, squashed ms "
        "| TorchScript plugin ms | eager ms | live / squashed | compile s (live / squashed) "
        "| diff vs eager (live / squashed) | after set_mask: first run ms, diff (output moved) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                r = bench_model(name, batch, args.rounds, Path(folder))
                ms = r["ms"]
                line = (
                    f"| {name} | {batch} | {ms['package, masks live']:.1f} | {ms['package, operator']:.1f} "
                    f"| {ms['package, squashed']:.1f} "
                    f"| {ms['TorchScript plugin']:.1f} | {ms['eager (torch.ao.pruning)']:.1f} | {r['ratio']:.3f} "
                    f"| {r['compile'][0]:.0f} / {r['compile'][1]:.0f} "
                    f"| {r['diffs']['package, masks live']:.1e} / {r['diffs']['package, squashed']:.1e} "
                    f"| {r['first_run_ms']:.1f}, {r['set_mask_diff']:.1e} ({r['moved']:.2f}) |"
                )
                lines.append(line)
                print(line, flush=True)
    footer = (
        f"\n{args.threads} thread(s), {args.rounds} interleaved rounds, medians; torch {torch.__version__}. "
        "Differences are max |diff| / max |eager output|; after set_mask, the package's first run against the "
        "eager model with the same new mask (and how far that mask moved the output). "
        "Target: live / squashed within 1.05 at batch 1."
    )
    print(footer)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n" + footer + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
