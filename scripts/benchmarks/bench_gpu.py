#!/usr/bin/env python3
"""GPU benchmark of sparsity::fake_sparsity against PyTorch's `mask * x`.

For float32 x of 2^26 and 2^28 elements: fake_sparsity with float32, bool and
uint8 masks, `mask * x` with the same masks, and a device-to-device copy of x
(the bandwidth ceiling) measured in the same run. Each run is timed with CUDA
events, after warm-up runs. fake_sparsity with a mask and the `mask * x` it is
compared with (same mask, float32 mask) take turns, one run each per round:
a row's time is the median of its --runs runs, and its speed against `mask * x`
the median over rounds of that round's ratio (both ran moments apart). Bytes
moved: x read + mask read + output written (the copy: x read + y written).

    python3 scripts/benchmarks/bench_gpu.py [--runs 50] [--out table.txt]
        [--check] [--json rows.json] [--sizes 26 28] [--device cuda] [--commit SHA]

--check first compares fake_sparsity and fake_sparsity_ bit for bit with
`mask * x` and `x.mul_(mask)` over several dtypes, lengths that are not
multiples of 16, and views whose data pointers are misaligned (each in-place
case also checks that nothing outside the view was written); it prints one
line per failure and the exit status is 3 when any case fails (the timings
still run). --json writes the check and every table row as JSON, with the
device's name, the torch and CUDA versions and the commit measured (--commit,
else $TORCH_SPARSITY_COMMIT, else the checkout's HEAD, "-dirty" when tracked
files differ from it).
--device cpu runs everything on the CPU (perf_counter timing), only to try
this script on a machine without a GPU.

The plugin is $TORCH_SPARSITY_LIBRARY, else build/libtorch_sparsity.so.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import torch_sparsity  # loads the plugin

from bench_op import paired_ratio  # noqa: E402

SIZES = [26, 28]
MASK_DTYPES = [torch.float32, torch.bool, torch.uint8]

_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _one_ms(fn, device):
    """Milliseconds of one fn(): CUDA events on the current stream (perf_counter on the CPU)."""
    if device == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_interleaved(fns, runs, warmup, device="cuda"):
    """name -> milliseconds of each of `runs` calls. The functions take
    turns, one call each per round, in an order rotated every round, so that
    the cases compared ran moments apart (clock and temperature drift hit all
    alike) and none always follows the same other one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    order = list(fns)
    samples = {name: [] for name in fns}
    for run in range(runs):
        shift = run % len(order)
        for name in order[shift:] + order[:shift]:
            samples[name].append(_one_ms(fns[name], device))
    return samples


def commit_measured(given):
    """The commit the run measures: --commit, $TORCH_SPARSITY_COMMIT, or the
    checkout's HEAD (with '-dirty' when files differ from it)."""
    if given:
        return given
    if os.environ.get("TORCH_SPARSITY_COMMIT"):
        return os.environ["TORCH_SPARSITY_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _same_bits(actual, expected):
    """Same dtype, shape and bits (so -0.0 differs from 0.0); the inputs hold
    no NaN, so the bits of a correct result are determined."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    return torch.equal(actual.view(_BITS[actual.dtype]), expected.view(_BITS[expected.dtype]))


def _check_inputs(length, x_dtype, mask_dtype, pad, device, gen):
    """Buffers of length + pad elements: x from randn with exact zeros and
    negative values (so -0.0 results), a 0/1 mask, and for floating masks also
    0.5 and -2 (rounding and sign)."""
    n = length + pad
    x = torch.randn(n, generator=gen, device=device)
    x[torch.rand(n, generator=gen, device=device) < 0.05] = 0.0
    keep = torch.rand(n, generator=gen, device=device) > 0.5
    if mask_dtype in (torch.bool, torch.uint8):
        mask = keep.to(mask_dtype)
    else:
        mask = keep.float()
        pick = torch.rand(n, generator=gen, device=device)
        mask[pick < 0.1] = 0.5
        mask[pick > 0.9] = -2.0
        mask = mask.to(mask_dtype)
    return x.to(x_dtype), mask


def check_correctness(fake_sparsity, fake_sparsity_, device):
    """Bitwise comparisons of both forms with PyTorch on dense views at
    several alignments; returns (number of cases, failure messages)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x_dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    mask_dtypes = [torch.bool, torch.uint8, torch.float32, torch.float16]
    lengths = [1, 15, 16, 17, 1000, 4096 + 13, (1 << 20) + 7]
    # Element offsets of the x and mask views: aligned, misaligned for every
    # pack width, and aligned for one tensor only.
    offsets = [(0, 0), (1, 1), (0, 1), (1, 0), (2, 2), (4, 4), (4, 0), (0, 4), (8, 8), (16, 16), (16, 0), (0, 16)]
    cases = [(xd, md, n, off) for xd in x_dtypes for md in mask_dtypes for n in lengths for off in offsets]
    if device == "cuda":
        # Many grid-stride rounds and a tail, for the common pairs.
        big = (1 << 24) + 5
        cases += [(torch.float32, md, big, off) for md in MASK_DTYPES for off in [(0, 0), (16, 16), (4, 4), (1, 1)]]
    pad = 32
    failures = []
    for x_dtype, mask_dtype, length, (ox, om) in cases:
        xbuf, mbuf = _check_inputs(length, x_dtype, mask_dtype, pad, device, gen)
        x, mask = xbuf[ox : ox + length], mbuf[om : om + length]
        what = f"x {dtype_name(x_dtype)}[{ox}:], mask {dtype_name(mask_dtype)}[{om}:], {length} elements"
        if not _same_bits(fake_sparsity(x, mask), mask * x):
            failures.append(f"fake_sparsity, {what}")
        expected = x.clone()
        expected.mul_(mask)
        ybuf = xbuf.clone()
        y = ybuf[ox : ox + length]
        fake_sparsity_(y, mask)
        if not _same_bits(y, expected):
            failures.append(f"fake_sparsity_, {what}")
        outside = torch.ones(length + pad, dtype=torch.bool, device=device)
        outside[ox : ox + length] = False
        if not _same_bits(ybuf[outside], xbuf[outside]):
            failures.append(f"fake_sparsity_ wrote outside its view, {what}")
    return 2 * len(cases), failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per case (median is reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--check", action="store_true", help="check results bit for bit first (exit status 3 if wrong)")
    parser.add_argument("--json", help="write the check result and the table rows to this JSON file")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=SIZES, metavar="LOG2", help="sizes as powers of two (default 26 28)"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: only to try the script")
    parser.add_argument("--commit", help="the commit measured, for the JSON (default: $TORCH_SPARSITY_COMMIT or git)")
    args = parser.parse_args()
    device = args.device

    if device == "cuda" and not torch.cuda.is_available():
        print(
            f"bench_gpu.py: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "this benchmark needs a GPU",
            file=sys.stderr,
        )
        return 2
    library = torch_sparsity.load_library()
    if device == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("sparsity::fake_sparsity", "CUDA"):
        print(f"bench_gpu.py: {library} has no CUDA kernels (built without CUDA?)", file=sys.stderr)
        return 2
    fake_sparsity = torch.ops.sparsity.fake_sparsity

    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    report = {
        "benchmark": "bench_gpu.py", "device_name": device_name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "commit": commit_measured(args.commit), "library": library, "device": device,
        "runs": args.runs, "check": None, "rows": [],
    }
    check_failed = False
    if args.check:
        start = time.perf_counter()
        cases, failures = check_correctness(fake_sparsity, torch.ops.sparsity.fake_sparsity_, device)
        check_failed = bool(failures)
        for failure in failures[:20]:
            print(f"check: WRONG: {failure}", flush=True)
        verdict = f"WRONG in {len(failures)} of {cases} cases" if failures else f"ok, {cases} cases"
        print(f"check: {verdict} ({time.perf_counter() - start:.1f}s)", flush=True)
        report["check"] = {"ok": not failures, "cases": cases, "failures": failures}

    header = (
        f"{'elements':>8}  {'case':<30} {'ms':>8} {'GB/s':>8} {'of copy':>8} "
        f"{'vs mask*x':>10} {'vs float*x':>10}"
    )
    lines = [
        f"torch {torch.__version__}, {device_name}, library {library}",
        f"float32 x; median of {args.runs} runs after {args.warmup} warm-up runs, the cases compared interleaved",
        "GB/s: (x read + mask read + out written) / time; copy: (read + write) / time",
        "of copy: GB/s / copy GB/s; vs mask*x: time of mask * x with the same mask / time;",
        "vs float*x: time of mask * x with a float32 mask / time (>1: this row is faster);",
        "both ratios are medians over rounds of one round's ratio",
        header,
        "-" * len(header),
    ]
    print("\n".join(lines), flush=True)

    def emit(numel, case, mask_dtype, times, bytes_moved, copy_gbps, same_mask_times=None, float_mask_times=None):
        """One row: the median of `times`, and the paired speed against the
        runs of `mask * x` with the same mask and with a float32 mask."""
        label = f"2^{numel.bit_length() - 1}"
        title = case if mask_dtype is None else f"{case}, {dtype_name(mask_dtype)} mask"
        ms = statistics.median(times)
        gbps = bytes_moved / ms / 1e6
        vs_same = paired_ratio(same_mask_times, times) if same_mask_times else None
        vs_float = paired_ratio(float_mask_times, times) if float_mask_times else None
        line = (f"{label:>8}  {title:<30} {ms:8.3f} {gbps:8.1f} {gbps / copy_gbps:8.2f} "
                + (f"{vs_same:10.2f}" if vs_same else f"{'':>10}") + " "
                + (f"{vs_float:10.2f}" if vs_float else f"{'':>10}"))
        lines.append(line)
        print(line, flush=True)
        report["rows"].append(
            {
                "elements": numel,
                "case": case,
                "mask": None if mask_dtype is None else dtype_name(mask_dtype),
                "ms": ms,
                "gbps": gbps,
                "of_copy": gbps / copy_gbps,
                "vs_same_mask": vs_same,
                "vs_float_mask": vs_float,
            }
        )
        return gbps

    for numel in (1 << s for s in args.sizes):
        x = torch.randn(numel, device=device)
        y = torch.empty_like(x)
        copy_times = time_interleaved({"copy": lambda: y.copy_(x)}, args.runs, args.warmup, device)["copy"]
        copy_gbps = 2 * x.numel() * x.element_size() / statistics.median(copy_times) / 1e6
        emit(numel, "copy y.copy_(x)", None, copy_times, 2 * x.numel() * x.element_size(), copy_gbps)
        del y
        float_mask = (torch.rand(numel, device=device) > 0.5).float()
        for mask_dtype in MASK_DTYPES:
            mask = float_mask.to(mask_dtype)
            bytes_moved = x.numel() * (x.element_size() + mask.element_size() + 4)  # float32 out
            fns = {"ours": lambda: fake_sparsity(x, mask), "float mask * x": lambda: float_mask * x}
            if mask_dtype != torch.float32:
                fns["mask * x"] = lambda: mask * x
            times = time_interleaved(fns, args.runs, args.warmup, device)
            same = times.get("mask * x", times["float mask * x"])
            emit(numel, "fake_sparsity", mask_dtype, times["ours"], bytes_moved, copy_gbps, same, times["float mask * x"])
            emit(numel, "mask * x", mask_dtype, same, bytes_moved, copy_gbps, same, times["float mask * x"])
            del mask
        del x, float_mask
        if device == "cuda":
            torch.cuda.empty_cache()

    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 3 if check_failed else 0


if __name__ == "__main__":
    sys.exit(main())
