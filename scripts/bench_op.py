#!/usr/bin/env python3
"""CPU benchmark of sparsity::fake_sparsity against mask * x.

Every figure comes from this one run: the median time of the plugin's
operator, of `mask * x` with the same mask, of `mask * x` with a float32
mask, and of a plain copy into a preallocated tensor (y.copy_(x)), whose bytes
read plus written per second is the bandwidth the kernels are held against.
Each timed sample runs the calls inside TorchScript, as a deployed model
does (see _fake_sparsity_loop). The samples are interleaved in random order; a speed-up is the median over
rounds of that round's ratio. fake_sparsity and mask * x both allocate their
result, so at large sizes both pay the page faults of fresh memory, which the
copy does not. Bytes moved by
fake_sparsity: x read + mask read + result written.

    .venv/bin/python scripts/bench_op.py [--sizes 1M 16M] [--repeat 50]
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_sparsity  # noqa: E402

torch_sparsity.load_library()  # before the scripted loops below are compiled

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.upper()
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


# The timed calls run inside TorchScript, as in a deployed model: from Python,
# torch.ops adds a few microseconds of argument parsing per call that
# Tensor.__mul__ does not pay, which is no property of the kernels.
@torch.jit.script
def _fake_sparsity_loop(x: torch.Tensor, mask: torch.Tensor, calls: int) -> torch.Tensor:
    out = x
    for _ in range(calls):
        out = torch.ops.sparsity.fake_sparsity(x, mask)
    return out


@torch.jit.script
def _mul_loop(x: torch.Tensor, mask: torch.Tensor, calls: int) -> torch.Tensor:
    out = x
    for _ in range(calls):
        out = mask * x
    return out


@torch.jit.script
def _copy_loop(x: torch.Tensor, out: torch.Tensor, calls: int) -> torch.Tensor:
    for _ in range(calls):
        out.copy_(x)
    return out


def interleaved_samples(fns: dict, repeat: int) -> dict:
    """Seconds of each call of each function, timed in turns (in a new random order
    each round) so that drift in the machine's speed, and whatever one call
    leaves in the caches for the next, hits all of them alike."""
    for fn in fns.values():  # warm-up: allocator, page faults, thread pool
        fn()
        fn()
    samples = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeat):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def median(samples):
    return statistics.median(samples)


def paired_ratio(numerators, denominators):
    """Median over rounds of one round's ratio: both sides of each pair ran
    moments apart, so the machine's drift cancels out."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def bench_size(numel: int, x_dtype: torch.dtype, mask_dtypes, repeat: int):
    x = torch.randn(numel).to(x_dtype)
    keep = torch.rand(numel) > 0.5
    masks = {dtype: keep.to(dtype) for dtype in mask_dtypes}
    float_mask = keep.to(torch.float32)
    copy_out = torch.empty_like(x)

    # Calls per sample: enough that one sample lasts about a millisecond.
    calls = max(1, (1 << 20) // numel)
    fns = {
        "copy": lambda: _copy_loop(x, copy_out, calls),
        "mul_float_mask": lambda: _mul_loop(x, float_mask, calls),
    }
    for dtype, mask in masks.items():
        fns[f"ours_{dtype}"] = lambda mask=mask: _fake_sparsity_loop(x, mask, calls)
        fns[f"mul_{dtype}"] = lambda mask=mask: _mul_loop(x, mask, calls)
    samples = interleaved_samples(fns, repeat)
    samples = {name: [t / calls for t in s] for name, s in samples.items()}
    t = {name: median(s) for name, s in samples.items()}

    copy_bw = 2 * x.element_size() * numel / t["copy"]
    rows = []
    for dtype, mask in masks.items():
        out_size = torch.promote_types(x_dtype, dtype).itemsize
        moved = numel * (x.element_size() + mask.element_size() + out_size)
        ours = t[f"ours_{dtype}"]
        rows.append(
            {
                "elements": numel,
                "x": str(x_dtype).replace("torch.", ""),
                "mask": str(dtype).replace("torch.", ""),
                "ours_ms": ours * 1e3,
                "mul_ms": t[f"mul_{dtype}"] * 1e3,
                "vs_mul": paired_ratio(samples[f"mul_{dtype}"], samples[f"ours_{dtype}"]),
                "vs_mul_float_mask": paired_ratio(samples["mul_float_mask"], samples[f"ours_{dtype}"]),
                "GBps": moved / ours / 1e9,
                "of_copy_bw": moved / ours / copy_bw,
                "copy_GBps": copy_bw / 1e9,
            }
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1M", "16M"], help="element counts (K, M, G suffixes)")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--x-dtypes", nargs="+", default=["float32"])
    parser.add_argument("--mask-dtypes", nargs="+", default=["float32", "bool", "uint8"])
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    mask_dtypes = [getattr(torch, d) for d in args.mask_dtypes]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, medians of {args.repeat} interleaved runs")
    print("| elements | x | mask | fake_sparsity ms | mask * x ms | speed-up vs mask * x "
          "| vs mask * x (float mask) | GB/s | of copy bandwidth |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    slower = []
    for x_dtype in args.x_dtypes:
        for size in args.sizes:
            for r in bench_size(parse_size(size), getattr(torch, x_dtype), mask_dtypes, args.repeat):
                print(f"| {size} | {r['x']} | {r['mask']} | {r['ours_ms']:.3f} | {r['mul_ms']:.3f} "
                      f"| {r['vs_mul']:.2f}x | {r['vs_mul_float_mask']:.2f}x | {r['GBps']:.1f} "
                      f"| {100 * r['of_copy_bw']:.0f}% (copy {r['copy_GBps']:.1f} GB/s) |")
                if r["vs_mul"] < 1.0:
                    slower.append(f"{size} {r['x']} x, {r['mask']} mask: {r['vs_mul']:.3f}x")
    print("slower than mask * x: " + ("; ".join(slower) if slower else "none"))


if __name__ == "__main__":
    main()
