#!/usr/bin/env python3
"""CPU benchmark of torch_sparsity.shrink: a model with half of its internal
channels masked, shrunk, against the same model dense.

Each model (torchvision resnet18, mobilenet_v3_small, vit_b_16; random
weights from torch.manual_seed(0), nothing downloaded) has half of its
internal channels masked with torch.nn.utils.prune (tests/python/
shrink_models.py: conv1 of every residual block, the expanded channels of
every inverted residual, the hidden units of every MLP; every slice of a
masked channel masked, so that it is exactly zero where it is consumed).
Two models come from it, both plain (no masks, no hooks):

- dense: the masked model with every pruned tensor replaced by its masked
  value (same shapes as the original);
- shrunk: torch_sparsity.shrink of the masked model on a 1x3x224x224 input,
  any mask left replaced by its masked value likewise.

Before any timing, the shrunk model's output is compared with the masked
model's (float32: within 1e-5 of the output's scale), and each package's
with its eager model's (1e-4); the run stops if one is off.

Figures: parameters, multiply-adds of one 224x224 image (torch's
FlopCounterMode: convolutions, matrix products, attention; half its FLOPs),
the size of the torch.save'd state dict and of the AOTInductor package.
Latency, torch.no_grad(), at each batch and thread count: eager, and as
AOTInductor packages (torch._inductor.aoti_compile_and_package of the
non-strict export, batch dynamic (1 to 64) and OpenMP threads following
torch.set_num_threads, so one package per model serves every
configuration). Timed samples are taken in interleaved rounds (every variant
once per round, in a new random order, each timed call right after an
untimed one: bench_models.timed_rounds) until --rounds rounds, or --budget
seconds once 2 rounds are done. Times are medians; a speed-up is the median
over rounds of that round's dense / shrunk.

Target: resnet18's packages at batch 1 run at least 0.8 times the ratio of
multiply-adds faster shrunk than dense.

    .venv/bin/python scripts/benchmarks/bench_shrink.py [--models resnet18,mobilenet_v3_small,vit_b_16]
        [--batches 1,32] [--threads 1,2] [--rounds 10] [--budget 20] [--out bench-results/shrink.json]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import torch_sparsity

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))
from bench_models import timed_rounds  # noqa: E402
from bench_op import paired_ratio  # noqa: E402
from end_to_end_models import mha_slow_path  # noqa: E402
from shrink_models import effective_dense, masked_torchvision_model  # noqa: E402

MODELS = ("resnet18", "mobilenet_v3_small", "vit_b_16")
IMAGE = 224
TARGET = 0.8  # of the multiply-add ratio, resnet18 packages at batch 1


def image(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def multiply_adds(model, x) -> int:
    # MultiheadAttention's eager fast path is one fused op that the counter misses.
    with torch.no_grad(), mha_slow_path(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def file_bytes(path) -> int:
    return os.path.getsize(path)


def relative_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() / b.abs().max().item()


def check(what: str, diff: float, tolerance: float):
    if not diff <= tolerance:  # also catches NaN
        raise SystemExit(f"{Path(sys.argv[0]).name}: {what} differs by {diff:.3g} of the output's scale "
                         f"(> {tolerance:g})")


def compile_package(model, path: Path):
    """An AOTInductor package with a dynamic batch; returns (runner, seconds)."""
    start = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (image(2),), dynamic_shapes=({0: batch},), strict=False)
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(path), inductor_configs={"cpp.dynamic_threads": True}
    )
    return torch._inductor.aoti_load_package(str(path)), time.perf_counter() - start


def build(name: str, folder: Path, log):
    """The dense and shrunk models, their figures and packages."""
    start = time.perf_counter()
    masked, _, _ = masked_torchvision_model(name)
    x = image(1)
    shrunk_masked = torch_sparsity.shrink(masked, (x,))
    shrink_s = time.perf_counter() - start
    models = {"dense": effective_dense(masked), "shrunk": effective_dense(shrunk_masked)}
    with torch.no_grad(), mha_slow_path():
        expected = masked(x)
        check(f"{name}: the shrunk model", relative_diff(shrunk_masked(x), expected), 1e-5)
    figures = {"shrink_s": shrink_s}
    runners = {}
    for variant, model in models.items():
        torch.save(model.state_dict(), folder / f"{name}-{variant}.pt")
        runners[variant], compile_s = compile_package(model, folder / f"{name}-{variant}.pt2")
        with torch.no_grad():
            check(f"{name}: the {variant} package", relative_diff(runners[variant](x), model(x)), 1e-4)
        figures[variant] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "multiply_adds": multiply_adds(model, x),
            "state_dict_bytes": file_bytes(folder / f"{name}-{variant}.pt"),
            "package_bytes": file_bytes(folder / f"{name}-{variant}.pt2"),
            "compile_s": compile_s,
        }
        log(f"# {name} {variant}: {figures[variant]}")
    return models, runners, figures


def timed_variants(models, runners, x, args) -> dict:
    """Samples of each model eager ("eager <variant>") and each package
    ("package <variant>") on ``x``: one warm-up call each, then interleaved
    rounds (timed_rounds)."""
    fns = {f"eager {variant}": (lambda m=model: m(x)) for variant, model in models.items()}
    fns |= {f"package {variant}": (lambda r=runner: r(x)) for variant, runner in runners.items()}
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn()
        return timed_rounds(fns, args.rounds, args.budget, min(2, args.rounds), primed=True)


def bench_latency(name, models, runners, batches, threads, args, log):
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        for batch in batches:
            x = image(batch, seed=2)
            samples = timed_variants(models, runners, x, args)
            ms = {variant: 1000 * statistics.median(s) for variant, s in samples.items()}
            row = {
                "model": name, "batch": batch, "threads": count, "rounds": len(samples["eager dense"]), "ms": ms,
                "speedup_eager": paired_ratio(samples["eager dense"], samples["eager shrunk"]),
                "speedup_package": paired_ratio(samples["package dense"], samples["package shrunk"]),
            }
            log(f"# {name} batch {batch}, {count} thread(s): " + ", ".join(f"{v} {t:.1f} ms" for v, t in ms.items())
                + f"; speed-up eager {row['speedup_eager']:.2f}, package {row['speedup_package']:.2f}")
            rows.append(row)
    return rows


def ratio(figures, key) -> float:
    return figures["dense"][key] / figures["shrunk"][key]


def tables(results) -> list:
    lines = [
        "| model | parameters (M) | multiply-adds (G) | state dict (MiB) | package (MiB) | compile s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, figures in results["figures"].items():
        d, s = figures["dense"], figures["shrunk"]
        lines.append(
            f"| {name} | {d['parameters'] / 1e6:.3g} -> {s['parameters'] / 1e6:.3g} ({ratio(figures, 'parameters'):.2f}x) "
            f"| {d['multiply_adds'] / 1e9:.3g} -> {s['multiply_adds'] / 1e9:.3g} ({ratio(figures, 'multiply_adds'):.2f}x) "
            f"| {d['state_dict_bytes'] / 2**20:.1f} -> {s['state_dict_bytes'] / 2**20:.1f} "
            f"| {d['package_bytes'] / 2**20:.1f} -> {s['package_bytes'] / 2**20:.1f} "
            f"| {d['compile_s']:.0f} / {s['compile_s']:.0f} |"
        )
    lines += [
        "",
        "| model | batch | threads | eager dense ms | eager shrunk ms | speed-up | package dense ms "
        "| package shrunk ms | speed-up | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["latency"]:
        ms = row["ms"]
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['threads']} | {ms['eager dense']:.1f} | {ms['eager shrunk']:.1f} "
            f"| {row['speedup_eager']:.2f} | {ms['package dense']:.1f} | {ms['package shrunk']:.1f} "
            f"| {row['speedup_package']:.2f} | {row['rounds']} |"
        )
    return lines


def target_lines(results) -> list:
    figures = results["figures"].get("resnet18")
    rows = [r for r in results["latency"] if r["model"] == "resnet18" and r["batch"] == 1]
    if not figures or not rows:
        return ["target: not measured (needs resnet18 at batch 1)"]
    needed = TARGET * ratio(figures, "multiply_adds")
    return [
        f"target: resnet18 packages at batch 1, {r['threads']} thread(s): speed-up {r['speedup_package']:.2f} "
        f"{'>=' if r['speedup_package'] >= needed else '<'} {needed:.2f} ({TARGET} x the multiply-add ratio): "
        f"{'met' if r['speedup_package'] >= needed else 'MISSED'}"
        for r in rows
    ]


def parse_list(text, what, choices=None):
    items = [t for t in text.split(",") if t]
    if not items or (choices and any(t not in choices for t in items)):
        raise SystemExit(f"{Path(sys.argv[0]).name}: {what}: expected a comma-separated subset of "
                         f"{choices or 'sizes'}, got {text!r}")
    if choices:
        return items
    if not all(t.isdigit() and int(t) > 0 for t in items):
        raise SystemExit(f"{Path(sys.argv[0]).name}: {what}: expected positive sizes, got {text!r}")
    return [int(t) for t in items]


def timing_parser(description: str, threads: str, out: str) -> argparse.ArgumentParser:
    """The options this benchmark shares with bench_channel_pruner.py."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the default")
    parser.add_argument("--batches", default="1,32", help="inference batch sizes (default 1,32)")
    parser.add_argument("--threads", default=threads, help=f"thread counts (default {threads})")
    parser.add_argument("--rounds", type=int, default=10, help="most timed rounds per configuration (default 10)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed rounds per configuration after which no new round starts, once "
                        "2 rounds are done (default 20)")
    parser.add_argument("--out", default=out, help="the JSON file to write")
    return parser


def main(argv=None) -> int:
    parser = timing_parser(__doc__, "1,2", "bench-results/shrink.json")
    args = parser.parse_args(argv)
    models = parse_list(args.models, "--models", MODELS)
    batches = parse_list(args.batches, "--batches")
    threads = parse_list(args.threads, "--threads")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    warnings.simplefilter("ignore", FutureWarning)
    torch.set_num_threads(max(threads))

    def log(line):
        print(line, flush=True)

    started = time.perf_counter()
    results = {"torch": torch.__version__, "cpus": os.cpu_count(), "image": IMAGE, "figures": {}, "latency": []}
    with tempfile.TemporaryDirectory() as folder:
        for name in models:
            torch.set_num_threads(max(threads))
            dense_shrunk, runners, figures = build(name, Path(folder), log)
            results["figures"][name] = figures
            results["latency"] += bench_latency(name, dense_shrunk, runners, batches, threads, args, log)
            del dense_shrunk, runners
    results["targets"] = target_lines(results)
    results["seconds"] = time.perf_counter() - started
    for line in [""] + tables(results) + [""] + results["targets"]:
        print(line, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"# wrote {args.out}; took {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
