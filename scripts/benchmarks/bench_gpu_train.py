#!/usr/bin/env python3
"""GPU benchmark of one training step of a pruned torchvision model: the
eager model that torch.ao.pruning made against the plugin's models.

The model (resnet18 by default; random weights from torch.manual_seed(0),
nothing downloaded) has the weight of every Linear and Conv layer pruned to
50% with NDWeightNormSparsifier (torch_sparsity.sparsifiers). From that one
pruned model, each variant gets a copy of its own, on the device:

- eager: the torch.ao.pruning model itself, FakeSparsity parametrizations
  live (mask * weight in Python at every forward): the baseline;
- scripted: torch.jit.script(convert(model)), the plugin's FakeSparsity class;
- export: convert(model, target="export") run eagerly (mask buffers read
  through torch.ops.sparsity.fake_sparsity);
- export-compiled: torch.compile of that model (forward and backward);
- eager-compiled (with --variants): torch.compile of the parametrized model.

A step: zero_grad(set_to_none=True), forward, cross-entropy against random
labels, backward, torch.optim.SGD(lr=0.01, momentum=0.9).step(), then a
device synchronize (the time is the wall-clock time of the whole step,
launches included, as a training loop pays it). Dropout is off (p = 0) in
every copy, so all do the same deterministic thing; BatchNorm uses batch
statistics.

Check, before any timing: one step of every variant from the same start on
the same batch, against the eager model's step. The loss must be within 1e-3
of eager's, relative; each floating tensor of the state (weights, BatchNorm
statistics) must have moved as eager's did, ||update - eager update|| within
5% of ||eager update|| (an update, not a value: a BatchNorm bias starts at
zero, and a training step's gradients differ by a few tenths of a percent
between any two summation orders, which a small batch amplifies); every
pruned entry of every original weight must still hold its start value bit
for bit (no gradient reached it), and the other entries must have moved. A
dropped mask changes the loss or moves pruned entries; a dropped gradient
leaves a tensor where it started. The timings run either way; the exit
status is 3 when a check failed.

Timing: --warmup steps of every variant (compilation and TorchScript's
profiling runs happen there), then rounds: each round times one step of
every variant in a new random order, each right after an untimed step of the
same variant (bench_models.timed_rounds, primed). Reported: the median step
time of each variant, and its speed against eager, the median over rounds of
that round's eager time / the variant's time (>1: faster than eager).

    python3 scripts/benchmarks/bench_gpu_train.py [--model resnet18]
        [--batch 128] [--image-size 224] [--rounds 30] [--warmup 5]
        [--variants eager,scripted,export,export-compiled] [--json FILE]
        [--out FILE] [--commit SHA] [--device cuda|cpu]

--device cpu runs everything on the CPU, only to try the script where no GPU
is (tests/python/test_bench_gpu_train.py). The plugin is
$TORCH_SPARSITY_LIBRARY, else the installed package's library.
"""

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"`torch\.jit\.")

import torch_sparsity  # noqa: E402  (loads the plugin)

from bench_gpu import commit_measured  # noqa: E402
from bench_models import timed_rounds  # noqa: E402
from bench_op import paired_ratio  # noqa: E402
from torch_sparsity.convert import ORIGINAL_SUFFIX, convert, converted_name, parametrized_masks  # noqa: E402
from torch_sparsity.sparsifiers import prune_with_weight_norm  # noqa: E402

VARIANTS = ("eager", "scripted", "export", "export-compiled", "eager-compiled")
DEFAULT_VARIANTS = "eager,scripted,export,export-compiled"
LOSS_TOLERANCE = 1e-3
UPDATE_TOLERANCE = 0.05
NUM_CLASSES = 1000


def pruned_model(name: str):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    prune_with_weight_norm(model, 0.5)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def build_variants(pruned, names, device):
    """name -> model on the device, in train() mode, each with tensors of its own."""
    models = {}
    for name in names:
        start = copy.deepcopy(pruned)
        if name == "eager":
            model = start
        elif name == "eager-compiled":
            model = torch.compile(start)
        elif name == "scripted":
            model = torch.jit.script(convert(start))
        elif name == "export":
            model = convert(start, target="export")
        elif name == "export-compiled":
            model = torch.compile(convert(start, target="export"))
        else:
            raise ValueError(name)
        models[name] = model.to(device).train()
    return models


def state_of(model):
    """The state by the eager model's names (the parametrizations' masks left
    out: the converted models hold them apart from their state)."""
    module = getattr(model, "_orig_mod", model)
    return {converted_name(k): v for k, v in module.state_dict().items() if not k.endswith(".mask")}


def pruned_entries(pruned):
    """converted state name of each original weight -> where its mask is zero."""
    return {fqn + ORIGINAL_SUFFIX: mask == 0 for fqn, mask in parametrized_masks(pruned).items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a torchvision classification model (default resnet18)")
    parser.add_argument("--batch", type=int, default=128, help="training batch (default 128)")
    parser.add_argument("--image-size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds at most (default 60), "
                        "after at least 5 rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of every variant first (default 5)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: only to try the script")
    parser.add_argument("--commit", help="the commit measured, for the JSON (default: $TORCH_SPARSITY_COMMIT or git)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or "eager" not in names:
        parser.error(f"--variants: unknown {unknown}" if unknown else "--variants must include eager (the baseline)")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu_train.py: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})",
              file=sys.stderr)
        return 2
    library = torch_sparsity.load_library()
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    report = {
        "benchmark": "bench_gpu_train.py", "device_name": device_name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "commit": commit_measured(args.commit), "library": library,
        "model": args.model, "batch": args.batch, "image_size": args.image_size,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "check": None, "rows": [],
    }

    def log(line):
        print(line, flush=True)

    log(f"{args.model}, batch {args.batch} x 3 x {args.image_size} x {args.image_size}, training step; "
        f"torch {torch.__version__}, {device_name}, commit {report['commit']}")
    pruned = pruned_model(args.model)
    zero_entries = pruned_entries(pruned)
    start_state = {k: v.detach().clone() for k, v in state_of(pruned).items()}
    started = time.perf_counter()
    models = build_variants(pruned, names, device)
    optimizers = {v: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for v, m in models.items()}
    generator = torch.Generator().manual_seed(1000 + args.batch)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=generator).to(device)

    def step(variant):
        optimizers[variant].zero_grad(set_to_none=True)
        loss = F.cross_entropy(models[variant](x), labels)
        loss.backward()
        optimizers[variant].step()
        sync()
        return loss.detach()

    # ---- check: one step from the same start
    losses = {v: step(v).item() for v in models}
    first_step_s = time.perf_counter() - started
    states = {v: state_of(m) for v, m in models.items()}
    eager_state = states["eager"]
    check = {"ok": True, "first_step_s": first_step_s, "variants": {}}
    for v in models:
        worst, problems = 0.0, []
        for key, value in eager_state.items():
            other, start = states[v][key], start_state[key]
            if not value.is_floating_point():
                if not torch.equal(value, other):
                    problems.append(f"{key}: differs")
                continue
            update = value.double().cpu() - start.double()
            other_update = other.double().cpu() - start.double()
            norm = update.norm().item()
            diff = (other_update - update).norm().item() / max(norm, 1e-30)
            if norm > 0 and not diff <= UPDATE_TOLERANCE:  # NaN fails too
                problems.append(f"{key}: update off by {diff:.3g} of eager's")
            worst = max(worst, diff if norm > 0 else 0.0)
        for key, zeros in zero_entries.items():
            now, start = states[v][key].cpu(), start_state[key]
            if not torch.equal(now[zeros].view(torch.int32), start[zeros].view(torch.int32)):
                problems.append(f"{key}: a pruned entry moved (a gradient reached it)")
            if torch.equal(now[~zeros], start[~zeros]):
                problems.append(f"{key}: no entry moved (no gradient reached it)")
        loss_diff = abs(losses[v] - losses["eager"]) / max(abs(losses["eager"]), 1e-30)
        if not loss_diff <= LOSS_TOLERANCE:
            problems.append(f"loss {losses[v]} against eager {losses['eager']}")
        check["variants"][v] = {"loss": losses[v], "update_relative_diff": worst, "loss_relative_diff": loss_diff,
                                "problems": problems}
        check["ok"] = check["ok"] and not problems
        log(f"check {v:<16} loss {losses[v]:.6f}  largest update difference {worst:.3g} of eager's"
            + ("" if not problems else "  WRONG: " + "; ".join(problems[:5])))
    report["check"] = check
    log(f"first step of every variant (compilation included): {first_step_s:.1f}s")

    # ---- timing
    for _ in range(args.warmup):
        for v in models:
            step(v)
    samples = timed_rounds({v: (lambda v=v: step(v)) for v in models}, args.rounds, args.budget, 5,
                           seed=1, primed=True)
    header = f"{'variant':<16} {'step ms':>9} {'vs eager':>9}"
    lines = [
        f"{args.model} training step, batch {args.batch}, {device_name}, torch {torch.__version__}: "
        f"median of {len(samples['eager'])} rounds; vs eager: median of eager / variant per round (>1: faster)",
        header, "-" * len(header),
    ]
    for v, times in samples.items():
        ms = 1e3 * statistics.median(times)
        speed = paired_ratio(samples["eager"], times)
        report["rows"].append({"variant": v, "step_ms": ms, "vs_eager": speed, "rounds": len(times),
                               "samples_ms": [1e3 * t for t in times]})
        lines.append(f"{v:<16} {ms:9.2f} {speed:9.3f}")
    for line in lines:
        log(line)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if check["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
