#!/usr/bin/env python3
"""CPU benchmark of torch_sparsity.ChannelPruner at 50%, shrunk, against the
dense model and against Torch-Pruning's MagnitudePruner at the same ratio.

Each model (torchvision resnet18, mobilenet_v3_small, vit_b_16; random
weights from torch.manual_seed(0), BatchNorm statistics of a random batch,
nothing downloaded) gives three plain models:

- dense: the model itself;
- ours: ChannelPruner(1x3x224x224 input, sparsity_level=0.5) prepared with
  every Conv/Linear weight but the classifier's (resnet18 fc,
  mobilenet_v3_small classifier.*, vit_b_16 heads.*), one step(), then
  torch_sparsity.shrink of the masked model, its remaining masks applied
  (plain_copy: remove_parametrizations would break the masked model, whose
  parametrized classes its copies share);
- tp: Torch-Pruning's MagnitudePruner (MagnitudeImportance(p=1),
  pruning_ratio=0.5, the classifier in ignored_layers) on a copy of dense,
  one step(); for vit_b_16 as Torch-Pruning's torchvision example does it
  (round_to the number of heads, the model's hidden_dim set afterwards).

Before any timing, ours is compared with the masked model (float32: within
1e-5 of the output's scale) and each package with its eager model (1e-4);
the run stops if one is off. Recorded: parameters, multiply-adds of one
224x224 image (bench_shrink.multiply_adds), how far ours and tp are from
the masked model (tp is as close as ours where it removed the same channels
exactly) and how far the masked model and tp are from dense (pruning random
weights changes the output).

Latency, torch.no_grad(), at each batch and thread count: eager, and as
AOTInductor packages (bench_shrink.compile_package: batch dynamic, OpenMP
threads following torch.set_num_threads), in interleaved primed rounds
(bench_models.timed_rounds) until --rounds, or --budget seconds once 2
rounds are done. Times are medians; a speed-up is the median over rounds of
dense / pruned, both eager or both packages.

Targets, resnet18 and mobilenet_v3_small: ours within 5% of tp in
parameters and in multiply-adds, and our package's speed-up over the dense
package at least tp's eager speed-up, at every batch and thread count.
vit_b_16 is reported side by side without a target: its LayerNorms
normalize over the residual stream, so only hidden units can go exactly,
where Torch-Pruning halves the stream too and changes the output.

    .venv/bin/python scripts/benchmarks/bench_channel_pruner.py [--models resnet18,mobilenet_v3_small,vit_b_16]
        [--batches 1,32] [--threads 1] [--rounds 10] [--budget 20] [--eager-only]
        [--out bench-results/channel_pruner.json]
    .venv/bin/python scripts/benchmarks/bench_channel_pruner.py --merge A.json B.json ... [--plot FILE.png]
"""

import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
import torch_pruning as tp
import torchvision
from torch import nn

import torch_sparsity
from torch_sparsity.shrink_tensors import plain_copy
from torch_sparsity.sparsifiers import ChannelPruner
from bench_op import paired_ratio
from bench_shrink import (
    MODELS, check, compile_package, image, multiply_adds, parse_list, relative_diff, timed_variants, timing_parser,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))
from end_to_end_models import _lively_random_weights, mha_slow_path  # noqa: E402

CLASSIFIERS = {"resnet18": "fc", "mobilenet_v3_small": "classifier", "vit_b_16": "heads"}
LEVEL = 0.5
TOLERANCE = 0.05  # ours against tp, parameters and multiply-adds
TOOLS = ("ours", "tp")


def dense_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    _lively_random_weights(model, image(1))
    return model


def in_classifier(name: str, fqn: str) -> bool:
    return fqn == CLASSIFIERS[name] or fqn.startswith(CLASSIFIERS[name] + ".")


def ours(name: str, dense: nn.Module, x: torch.Tensor):
    """(masked model, shrunk plain model, seconds to prepare and step, seconds to shrink)."""
    masked = copy.deepcopy(dense)
    config = [{"tensor_fqn": f"{fqn}.weight"} for fqn, module in masked.named_modules()
              if isinstance(module, (nn.Conv2d, nn.Linear)) and not in_classifier(name, fqn)]
    start = time.perf_counter()
    pruner = ChannelPruner((x,), sparsity_level=LEVEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vit_b_16's stream is left alone, by design
        pruner.prepare(masked, config)
    pruner.step()
    pruned_s = time.perf_counter() - start
    shrunk = torch_sparsity.shrink(masked, (x,))
    return masked, plain_copy(shrunk), pruned_s, time.perf_counter() - start - pruned_s


def torch_pruning(name: str, dense: nn.Module, x: torch.Tensor):
    """(Torch-Pruning's model, seconds)."""
    model = copy.deepcopy(dense)
    options = {}
    if name == "vit_b_16":
        options["round_to"] = model.encoder.layers[0].num_heads
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the class token and position embedding are found alone
        pruner = tp.pruner.MagnitudePruner(
            model, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=LEVEL,
            ignored_layers=[model.get_submodule(CLASSIFIERS[name])], **options)
        pruner.step()
    if name == "vit_b_16":
        model.hidden_dim = model.conv_proj.out_channels  # torchvision reshapes by it in forward
    return model, time.perf_counter() - start


def build(name: str, folder: Path, eager_only: bool, log):
    """The three models, their figures and (unless eager_only) packages."""
    x = image(1)
    dense = dense_model(name)
    masked, shrunk, pruned_s, shrink_s = ours(name, dense, x)
    theirs, tp_s = torch_pruning(name, dense, x)
    models = {"dense": dense, "ours": shrunk, "tp": theirs}
    with torch.no_grad(), mha_slow_path():
        out = {variant: model(x) for variant, model in models.items()}
        expected = masked(x)
    check(f"{name}: ours", relative_diff(out["ours"], expected), 1e-5)
    figures = {
        "ours_prepare_step_s": pruned_s, "ours_shrink_s": shrink_s, "tp_s": tp_s,
        "diff_ours_vs_masked": relative_diff(out["ours"], expected),
        "diff_tp_vs_masked": relative_diff(out["tp"], expected),
        "diff_masked_vs_dense": relative_diff(expected, out["dense"]),
        "diff_tp_vs_dense": relative_diff(out["tp"], out["dense"]),
    }
    runners = {}
    for variant, model in models.items():
        figures[variant] = {"parameters": sum(p.numel() for p in model.parameters()),
                            "multiply_adds": multiply_adds(model, x)}
        if not eager_only:
            runners[variant], figures[variant]["compile_s"] = compile_package(model, folder / f"{name}-{variant}.pt2")
            with torch.no_grad():
                check(f"{name}: the {variant} package", relative_diff(runners[variant](x), model(x)), 1e-4)
        log(f"# {name} {variant}: {figures[variant]}")
    log(f"# {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items() if not isinstance(v, dict)))
    return models, runners, figures


def bench_latency(name, models, runners, batches, threads, args, log):
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        for batch in batches:
            x = image(batch, seed=2)
            samples = timed_variants(models, runners, x, args)
            row = {"model": name, "batch": batch, "threads": count, "rounds": len(samples["eager dense"]),
                   "ms": {variant: 1000 * statistics.median(s) for variant, s in samples.items()}, "speedup": {}}
            for mode in ("eager", "package") if runners else ("eager",):
                for tool in TOOLS:
                    row["speedup"][f"{mode} {tool}"] = paired_ratio(samples[f"{mode} dense"], samples[f"{mode} {tool}"])
            log(f"# {name} batch {batch}, {count} thread(s): "
                + ", ".join(f"{v} {t:.1f} ms" for v, t in row["ms"].items())
                + "; speed-up " + ", ".join(f"{v} {s:.2f}" for v, s in row["speedup"].items()))
            rows.append(row)
    return rows


def ratio(figures, tool, key) -> float:
    return figures["dense"][key] / figures[tool][key]


def tables(results) -> list:
    lines = [
        "| model | parameters (M): dense, ours, TP | multiply-adds (G): dense, ours, TP "
        "| ours / masked | TP / masked | masked / dense | TP / dense |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in results["figures"].items():
        params = ", ".join(f"{f[v]['parameters'] / 1e6:.3g}" for v in ("dense",) + TOOLS)
        macs = ", ".join(f"{f[v]['multiply_adds'] / 1e9:.3g}" for v in ("dense",) + TOOLS)
        lines.append(
            f"| {name} | {params} ({ratio(f, 'ours', 'parameters'):.2f}x, {ratio(f, 'tp', 'parameters'):.2f}x) "
            f"| {macs} ({ratio(f, 'ours', 'multiply_adds'):.2f}x, {ratio(f, 'tp', 'multiply_adds'):.2f}x) "
            f"| {f['diff_ours_vs_masked']:.1e} | {f['diff_tp_vs_masked']:.2g} | {f['diff_masked_vs_dense']:.2f} "
            f"| {f['diff_tp_vs_dense']:.2f} |"
        )
    lines += [
        "",
        "| model | batch | threads | eager dense / ours / TP ms | speed-up ours, TP "
        "| package dense / ours / TP ms | speed-up ours, TP | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["latency"]:
        ms, speedup = row["ms"], row["speedup"]
        cells = []
        for mode in ("eager", "package"):
            if f"{mode} ours" not in speedup:
                cells += ["-", "-"]
                continue
            cells.append(" / ".join(f"{ms[f'{mode} {v}']:.1f}" for v in ("dense",) + TOOLS))
            cells.append(f"{speedup[f'{mode} ours']:.2f}, {speedup[f'{mode} tp']:.2f}")
        lines.append(f"| {row['model']} | {row['batch']} | {row['threads']} | " + " | ".join(cells)
                     + f" | {row['rounds']} |")
    return lines


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def target_lines(results) -> list:
    lines = []
    for name, f in results["figures"].items():
        if name == "vit_b_16":
            lines.append("vit_b_16: no target (only hidden units can go exactly; see the table)")
            continue
        for key in ("parameters", "multiply_adds"):
            off = f["ours"][key] / f["tp"][key] - 1
            lines.append(f"target: {name} {key} of ours within {TOLERANCE:.0%} of TP's: {off:+.1%}: "
                         f"{met(abs(off) <= TOLERANCE)}")
        for row in (r for r in results["latency"] if r["model"] == name):
            ours_package, tp_eager = row["speedup"].get("package ours"), row["speedup"]["eager tp"]
            if ours_package is None:
                lines.append(f"target: {name} batch {row['batch']}: not measured (no packages)")
                continue
            lines.append(f"target: {name} batch {row['batch']}, {row['threads']} thread(s): our package's speed-up "
                         f"{ours_package:.2f} {'>=' if ours_package >= tp_eager else '<'} TP's eager {tp_eager:.2f}: "
                         f"{met(ours_package >= tp_eager)}")
    return lines


def plot(results, path: str) -> None:
    """Speed-up over dense against the multiply-add ratio, per model and tool, one panel per batch, at the
    fewest threads measured."""
    import matplotlib  # only for --plot: the benchmark itself runs without matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    threads = min(row["threads"] for row in results["latency"])
    rows = [row for row in results["latency"] if row["threads"] == threads]
    batches = sorted({row["batch"] for row in rows})
    figure, panels = pyplot.subplots(1, len(batches), figsize=(5 * len(batches), 4.5), squeeze=False, sharey=True)
    markers = {"resnet18": "o", "mobilenet_v3_small": "s", "vit_b_16": "^"}
    tools = {"ours": ("tab:blue", -0.03, "ChannelPruner, shrunk"), "tp": ("tab:orange", 0.03, "Torch-Pruning")}
    top = max(ratio(f, tool, "multiply_adds") for f in results["figures"].values() for tool in TOOLS)
    for axes, batch in zip(panels[0], batches):
        for row in (r for r in rows if r["batch"] == batch):
            f = results["figures"][row["model"]]
            for tool, (color, shift, _) in tools.items():
                for mode, fill in (("package", color), ("eager", "none")):
                    if f"{mode} {tool}" in row["speedup"]:
                        # The tools' points are drawn apart where their ratios are equal.
                        axes.scatter(ratio(f, tool, "multiply_adds") + shift, row["speedup"][f"{mode} {tool}"],
                                     marker=markers[row["model"]], facecolors=fill, edgecolors=color, s=50)
        axes.plot([1, top], [1, top], color="gray", linewidth=0.8, linestyle="--")
        axes.set_title(f"batch {batch}", fontsize=10)
        axes.set_xlabel("multiply-adds, dense / pruned")
        axes.grid(alpha=0.3)
    handles = [pyplot.Line2D([], [], marker=m, color="gray", linestyle="", label=n) for n, m in markers.items()]
    handles += [pyplot.Line2D([], [], marker="o", color=c, linestyle="", label=label) for c, _, label in tools.values()]
    handles += [pyplot.Line2D([], [], marker="o", color="gray", markerfacecolor="none", linestyle="",
                              label="hollow: eager, filled: package")]
    panels[0][0].legend(handles=handles, fontsize=8, loc="upper left")
    panels[0][0].set_ylabel("speed-up over dense (same mode)")
    figure.suptitle(f"50% of the channels, CPU, {threads} thread(s); dashed: speed-up = multiply-add ratio",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def merged(paths) -> dict:
    results = {"figures": {}, "latency": []}
    for path in paths:
        part = json.loads(Path(path).read_text())
        for name, figures in part["figures"].items():
            results["figures"].setdefault(name, figures)  # the first file's, as its timed rows come first
        results["latency"] += part["latency"]
    return results


def report(results, log) -> None:
    results["targets"] = target_lines(results)
    for line in [""] + tables(results) + [""] + results["targets"]:
        log(line)


def main(argv=None) -> int:
    parser = timing_parser(__doc__, "1", "bench-results/channel_pruner.json")
    parser.add_argument("--eager-only", action="store_true", help="no AOTInductor packages (a quick look)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="measure nothing: print the tables and targets of these result files together "
                        "(each model's figures from the first file that has it)")
    parser.add_argument("--plot", help="with --merge: draw the speed-up plot to this file (needs matplotlib)")
    args = parser.parse_args(argv)

    def log(line):
        print(line, flush=True)

    if args.merge:
        results = merged(args.merge)
        report(results, log)
        if args.plot:
            plot(results, args.plot)
            log(f"# wrote {args.plot}")
        return 0
    if args.plot:
        parser.error("--plot goes with --merge")
    models = parse_list(args.models, "--models", MODELS)
    batches = parse_list(args.batches, "--batches")
    threads = parse_list(args.threads, "--threads")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    warnings.simplefilter("ignore", FutureWarning)

    started = time.perf_counter()
    results = {"torch": torch.__version__, "torch_pruning": version("torch-pruning"), "cpus": os.cpu_count(),
               "figures": {}, "latency": []}
    with tempfile.TemporaryDirectory() as folder:
        for name in models:
            torch.set_num_threads(max(threads))
            variants, runners, figures = build(name, Path(folder), args.eager_only, log)
            results["figures"][name] = figures
            results["latency"] += bench_latency(name, variants, runners, batches, threads, args, log)
            del variants, runners
    report(results, log)
    results["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    log(f"# wrote {args.out}; took {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
