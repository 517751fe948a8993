#!/usr/bin/env python3
"""CPU benchmark of sparsity::fake_sparsity against mask * x.

Every figure comes from this one run: the median time of the plugin's
operator, of `mask * x` with the same mask, of `mask * x` with a float32
mask, and of a plain copy (y.copy_(x)), whose bytes read plus written per
second is the bandwidth the kernels are held against. Bytes moved by
fake_sparsity: x read + mask read + result written.

    .venv/bin/python scripts/bench_op.py [--sizes 1M 16M] [--repeat 50]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_sparsity  # noqa: E402

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.upper()
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


def interleaved_medians(fns: dict, repeat: int) -> dict:
    """Median seconds of each function, timed in turns so that drift in the
    machine's speed hits all of them alike."""
    for fn in fns.values():  # warm-up: allocator, page faults, thread pool
        fn()
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def bench_size(numel: int, x_dtype: torch.dtype, mask_dtypes, repeat: int):
    fake_sparsity = torch.ops.sparsity.fake_sparsity
    x = torch.randn(numel).to(x_dtype)
    keep = torch.rand(numel) > 0.5
    masks = {dtype: keep.to(dtype) for dtype in mask_dtypes}
    float_mask = keep.to(torch.float32)
    copy_out = torch.empty_like(x)

    fns = {"copy": lambda: copy_out.copy_(x), "mul_float_mask": lambda: float_mask * x}
    for dtype, mask in masks.items():
        fns[f"ours_{dtype}"] = lambda mask=mask: fake_sparsity(x, mask)
        fns[f"mul_{dtype}"] = lambda mask=mask: mask * x
    t = interleaved_medians(fns, repeat)

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
                "vs_mul": t[f"mul_{dtype}"] / ours,
                "vs_mul_float_mask": t["mul_float_mask"] / ours,
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

    torch_sparsity.load_library()
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
                    slower.append(f"{size} {r['x']} x, {r['mask']} mask: {r['vs_mul']:.2f}x")
    print("slower than mask * x: " + ("; ".join(slower) if slower else "none"))


if __name__ == "__main__":
    main()
