#!/usr/bin/env python3
"""CPU benchmark of sparsity::fake_sparsity against mask * x, and of
fake_structured_sparsity against mask.reshape(-1, 1) * x and a copy of x.

Every figure comes from this one run: the median time of the plugin's
operator, of `mask * x` with the same mask, of `mask * x` with a float32
mask, of the in-place fake_sparsity_ on a preallocated tensor, of a plain
copy into a preallocated tensor (y.copy_(x)), whose bytes read plus written
per second is the bandwidth the kernels are held against, and of x.clone(),
the same copy into freshly allocated memory. Each timed sample runs the calls
inside TorchScript, as a deployed model does (see _fake_sparsity_loop). The
samples are interleaved in random order; a speed-up is the median over rounds
of that round's ratio.

fake_sparsity, mask * x and clone allocate their result. Past glibc's mmap
threshold (32 MB at most) every allocation is a fresh mmap, and writing it
page-faults on every 4 KiB page, which costs more than the copy itself: at
large sizes all three are bound by that, not by memory bandwidth. The
in-place form and copy_ show the kernels without it; clone against copy_
shows what fresh memory costs. Bytes moved: x read + mask read + result
written (in place: x read + mask read + x written; copies: read + written).

    .venv/bin/python scripts/benchmarks/bench_op.py [--sizes 1M 16M] [--half-sizes 16M] [--repeat 50]
        [--plot bench-results/op_throughput.png] [--json bench-results/op.json]

--plot needs matplotlib (scripts/setup.sh installs it).
"""

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

import torch_sparsity  # loads the plugin


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
def _fake_sparsity_inplace_loop(y: torch.Tensor, mask: torch.Tensor, calls: int) -> torch.Tensor:
    for _ in range(calls):
        torch.ops.sparsity.fake_sparsity_(y, mask)
    return y


@torch.jit.script
def _structured_loop(x: torch.Tensor, mask: torch.Tensor, calls: int) -> torch.Tensor:
    out = x
    for _ in range(calls):
        out = torch.ops.sparsity.fake_structured_sparsity(x, mask)
    return out


@torch.jit.script
def _row_mul_loop(x: torch.Tensor, mask: torch.Tensor, calls: int) -> torch.Tensor:
    out = x
    rows = mask.reshape(-1, 1)
    for _ in range(calls):
        out = rows * x
    return out


@torch.jit.script
def _clone_loop(x: torch.Tensor, calls: int) -> torch.Tensor:
    out = x
    for _ in range(calls):
        out = x.clone()
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
    # In place, x is multiplied by the same 0/1 mask again and again: its
    # values settle at once and stay finite numbers or NaN, never denormals.
    inplace_x = {dtype: x.clone() for dtype in mask_dtypes}

    # Calls per sample: enough that one sample lasts about a millisecond.
    calls = max(1, (1 << 20) // numel)
    fns = {
        "copy": lambda: _copy_loop(x, copy_out, calls),
        "clone": lambda: _clone_loop(x, calls),
        "mul_float_mask": lambda: _mul_loop(x, float_mask, calls),
    }
    for dtype, mask in masks.items():
        fns[f"ours_{dtype}"] = lambda mask=mask: _fake_sparsity_loop(x, mask, calls)
        fns[f"mul_{dtype}"] = lambda mask=mask: _mul_loop(x, mask, calls)
        fns[f"inplace_{dtype}"] = lambda mask=mask, y=inplace_x[dtype]: _fake_sparsity_inplace_loop(y, mask, calls)
    samples = interleaved_samples(fns, repeat)
    samples = {name: [t / calls for t in s] for name, s in samples.items()}
    t = {name: median(s) for name, s in samples.items()}

    copy_bytes = 2 * x.element_size() * numel
    copy_bw = copy_bytes / t["copy"]
    rows = []
    for dtype, mask in masks.items():
        out_size = torch.promote_types(x_dtype, dtype).itemsize
        moved = numel * (x.element_size() + mask.element_size() + out_size)
        moved_inplace = numel * (2 * x.element_size() + mask.element_size())
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
                "mul_GBps": moved / t[f"mul_{dtype}"] / 1e9,
                "of_copy_bw": moved / ours / copy_bw,
                "inplace_GBps": moved_inplace / t[f"inplace_{dtype}"] / 1e9,
                "copy_GBps": copy_bw / 1e9,
                "clone_GBps": copy_bytes / t["clone"] / 1e9,
            }
        )
    return rows


STRUCTURED_ROWS = 512


def bench_structured(numel: int, mask_dtypes, repeat: int):
    """fake_structured_sparsity on a [512, numel / 512] float32 x (the rows of
    a weight) against mask.reshape(-1, 1) * x, and against copies of x: into
    fresh memory (clone, which allocates as both do) and into a preallocated
    tensor (copy_). A row mask is 512 entries: the bytes are those of a copy."""
    x = torch.randn(STRUCTURED_ROWS, numel // STRUCTURED_ROWS)
    keep = torch.rand(STRUCTURED_ROWS) > 0.5
    masks = {dtype: keep.to(dtype) for dtype in mask_dtypes}
    copy_out = torch.empty_like(x)
    calls = max(1, (1 << 20) // numel)
    fns = {"copy": lambda: _copy_loop(x, copy_out, calls), "clone": lambda: _clone_loop(x, calls)}
    for dtype, mask in masks.items():
        fns[f"ours_{dtype}"] = lambda mask=mask: _structured_loop(x, mask, calls)
        fns[f"mul_{dtype}"] = lambda mask=mask: _row_mul_loop(x, mask, calls)
    samples = interleaved_samples(fns, repeat)
    samples = {name: [t / calls for t in s] for name, s in samples.items()}
    t = {name: median(s) for name, s in samples.items()}
    copy_bytes = 2 * x.element_size() * x.numel()
    rows = []
    for dtype in masks:
        ours = t[f"ours_{dtype}"]
        rows.append({
            "elements": x.numel(),
            "mask": str(dtype).replace("torch.", ""),
            "ours_ms": ours * 1e3,
            "mul_ms": t[f"mul_{dtype}"] * 1e3,
            "clone_ms": t["clone"] * 1e3,
            "vs_mul": paired_ratio(samples[f"mul_{dtype}"], samples[f"ours_{dtype}"]),
            "vs_clone": paired_ratio(samples["clone"], samples[f"ours_{dtype}"]),
            "GBps": copy_bytes / ours / 1e9,
            "of_copy_bw": t["copy"] / ours,
        })
    return rows


def size_label(numel: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if numel >= unit and numel % unit == 0:
            return f"{numel // unit}{suffix}"
    return str(numel)


def plot(rows, path: str):
    """Throughput against size, one panel per mask dtype (float32 x only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["x"] == "float32"]
    mask_names = list(dict.fromkeys(r["mask"] for r in rows))
    fig, axes = plt.subplots(1, len(mask_names), figsize=(5 * len(mask_names), 4.2), sharey=True, squeeze=False)
    series = [
        ("GBps", "fake_sparsity", "C0", "o-"),
        ("mul_GBps", "mask * x", "C1", "s-"),
        ("inplace_GBps", "fake_sparsity_ (in place)", "C2", "^--"),
        ("copy_GBps", "copy_ (preallocated)", "k", "x:"),
        ("clone_GBps", "clone (fresh memory)", "0.5", "d:"),
    ]
    for ax, mask_name in zip(axes[0], mask_names):
        these = sorted((r for r in rows if r["mask"] == mask_name), key=lambda r: r["elements"])
        sizes = [r["elements"] for r in these]
        for key, label, color, style in series:
            ax.plot(sizes, [r[key] for r in these], style, color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [size_label(n) for n in sizes], rotation=45)
        ax.set_title(f"float32 x, {mask_name} mask")
        ax.set_xlabel("elements")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("GB/s (bytes read + written)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"CPU operator throughput, {torch.get_num_threads()} threads", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


DEFAULT_SIZES = ["1K", "4K", "16K", "64K", "256K", "1M", "4M", "16M", "64M"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=DEFAULT_SIZES, help="element counts (K, M, G suffixes)")
    parser.add_argument("--x-dtypes", nargs="+", default=["float32"], help="x dtypes run at --sizes")
    parser.add_argument("--half-sizes", nargs="*", default=["16M"], help="sizes at which float16 and bfloat16 x run too")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--mask-dtypes", nargs="+", default=["float32", "bool", "uint8"])
    parser.add_argument("--plot", default=None, help="write a PNG of throughput against size (needs matplotlib)")
    parser.add_argument("--json", default=None, help="write every row as JSON")
    parser.add_argument("--structured-sizes", nargs="*", default=["1M", "16M"],
                        help="sizes at which fake_structured_sparsity runs (float32 x of 512 rows)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    mask_dtypes = [getattr(torch, d) for d in args.mask_dtypes]
    runs = [(x_dtype, size) for x_dtype in args.x_dtypes for size in args.sizes]
    runs += [(x_dtype, size) for x_dtype in ("float16", "bfloat16") for size in args.half_sizes]
    load_before = os.getloadavg()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, medians of {args.repeat} interleaved runs, "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} at start")
    print("| elements | x | mask | fake_sparsity ms | mask * x ms | speed-up vs mask * x "
          "| vs mask * x (float mask) | GB/s | of copy bandwidth | in place GB/s | clone GB/s |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows, slower = [], []
    for x_dtype, size in runs:
        for r in bench_size(parse_size(size), getattr(torch, x_dtype), mask_dtypes, args.repeat):
            rows.append(r)
            print(f"| {size} | {r['x']} | {r['mask']} | {r['ours_ms']:.3f} | {r['mul_ms']:.3f} "
                  f"| {r['vs_mul']:.2f}x | {r['vs_mul_float_mask']:.2f}x | {r['GBps']:.1f} "
                  f"| {100 * r['of_copy_bw']:.0f}% (copy {r['copy_GBps']:.1f} GB/s) "
                  f"| {r['inplace_GBps']:.1f} | {r['clone_GBps']:.1f} |", flush=True)
            if r["vs_mul"] < 1.0:
                slower.append(f"{size} {r['x']} x, {r['mask']} mask: {r['vs_mul']:.3f}x")
    print("slower than mask * x: " + ("; ".join(slower) if slower else "none"))
    structured = []
    if args.structured_sizes:
        print("\n| elements | row mask | fake_structured_sparsity ms | mask.reshape(-1, 1) * x ms | clone ms "
              "| speed-up vs mask * x | vs clone | GB/s | of copy_ bandwidth |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.structured_sizes:
        for r in bench_structured(parse_size(size), mask_dtypes, args.repeat):
            structured.append(r)
            print(f"| {size} | {r['mask']} | {r['ours_ms']:.3f} | {r['mul_ms']:.3f} | {r['clone_ms']:.3f} "
                  f"| {r['vs_mul']:.2f}x | {r['vs_clone']:.2f}x | {r['GBps']:.1f} | {100 * r['of_copy_bw']:.0f}% |",
                  flush=True)
            if r["vs_mul"] < 1.0:
                slower.append(f"structured {size}, {r['mask']} mask: {r['vs_mul']:.3f}x")
    if structured:
        print("slower than mask * x (both operators): " + ("; ".join(slower) if slower else "none"))
    load_after = os.getloadavg()
    print(f"# load average {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} at end")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"load_before": load_before, "load_after": load_after, "rows": rows, "structured": structured}, indent=1
        ))
    if args.plot:
        plot(rows, args.plot)
        print(f"# plot: {args.plot}")


if __name__ == "__main__":
    main()
