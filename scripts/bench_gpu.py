#!/usr/bin/env python3
"""GPU benchmark of sparsity::fake_sparsity against PyTorch's `mask * x`.

For float32 x of 2^26 and 2^28 elements: fake_sparsity with float32, bool and
uint8 masks, `mask * x` with the same masks, and a device-to-device copy of x
(the bandwidth ceiling) measured in the same run. Each case is timed with CUDA
events: warm-up runs, then the median of --runs runs. Bytes moved: x read +
mask read + output written (the copy: x read + y written).

    python3 scripts/bench_gpu.py [--runs 50] [--out table.txt]

The plugin is $TORCH_SPARSITY_LIBRARY, else build/libtorch_sparsity.so.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_sparsity  # noqa: E402

SIZES = [1 << 26, 1 << 28]
MASK_DTYPES = [torch.float32, torch.bool, torch.uint8]


def time_ms(fn, runs, warmup):
    """Median milliseconds of fn() over runs, each timed with CUDA events on
    the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per case (median is reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print(
            f"bench_gpu.py: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "this benchmark needs a GPU",
            file=sys.stderr,
        )
        return 2
    library = torch_sparsity.load_library()
    if not torch._C._dispatch_has_kernel_for_dispatch_key("sparsity::fake_sparsity", "CUDA"):
        print(f"bench_gpu.py: {library} has no CUDA kernels (built without CUDA?)", file=sys.stderr)
        return 2
    fake_sparsity = torch.ops.sparsity.fake_sparsity

    device = torch.cuda.get_device_name()
    header = (
        f"{'elements':>8}  {'case':<30} {'ms':>8} {'GB/s':>8} {'of copy':>8} "
        f"{'vs mask*x':>10} {'vs float*x':>10}"
    )
    lines = [
        f"torch {torch.__version__}, {device}, library {library}",
        f"float32 x; median of {args.runs} runs after {args.warmup} warm-up runs",
        "GB/s: (x read + mask read + out written) / time; copy: (read + write) / time",
        "of copy: GB/s / copy GB/s; vs mask*x: time of mask * x with the same mask / time;",
        "vs float*x: time of mask * x with a float32 mask / time (>1: this row is faster)",
        header,
        "-" * len(header),
    ]
    print("\n".join(lines), flush=True)

    def emit(label, case, ms, bytes_moved, copy_gbps, same_mask_ref_ms=None, float_ref_ms=None):
        gbps = bytes_moved / ms / 1e6
        vs_same = f"{same_mask_ref_ms / ms:10.2f}" if same_mask_ref_ms else f"{'':>10}"
        vs_float = f"{float_ref_ms / ms:10.2f}" if float_ref_ms else f"{'':>10}"
        line = f"{label:>8}  {case:<30} {ms:8.3f} {gbps:8.1f} {gbps / copy_gbps:8.2f} {vs_same} {vs_float}"
        lines.append(line)
        print(line, flush=True)
        return gbps

    for numel in SIZES:
        label = f"2^{numel.bit_length() - 1}"
        x = torch.randn(numel, device="cuda")
        y = torch.empty_like(x)
        copy_ms = time_ms(lambda: y.copy_(x), args.runs, args.warmup)
        copy_gbps = 2 * x.numel() * x.element_size() / copy_ms / 1e6
        emit(label, "copy y.copy_(x)", copy_ms, 2 * x.numel() * x.element_size(), copy_gbps)
        del y
        float_mask = (torch.rand(numel, device="cuda") > 0.5).float()
        float_ref_ms = time_ms(lambda: float_mask * x, args.runs, args.warmup)
        for mask_dtype in MASK_DTYPES:
            mask = float_mask.to(mask_dtype)
            bytes_moved = x.numel() * (x.element_size() + mask.element_size() + 4)  # float32 out
            ours_ms = time_ms(lambda: fake_sparsity(x, mask), args.runs, args.warmup)
            if mask_dtype == torch.float32:
                ref_ms = float_ref_ms
            else:
                ref_ms = time_ms(lambda: mask * x, args.runs, args.warmup)
            name = dtype_name(mask_dtype)
            emit(label, f"fake_sparsity, {name} mask", ours_ms, bytes_moved, copy_gbps, ref_ms, float_ref_ms)
            emit(label, f"mask * x, {name} mask", ref_ms, bytes_moved, copy_gbps, ref_ms, float_ref_ms)
            del mask
        del x, float_mask
        torch.cuda.empty_cache()

    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
