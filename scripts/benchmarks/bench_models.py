#!/usr/bin/env python3
"""CPU benchmark of whole models pruned with torch.ao.pruning: inference
latency and memory, and one training step, of the eager parametrized model
against the scripted plugin model.

Each model (torchvision resnet18, mobilenet_v3_small, vit_b_16; random
weights from torch.manual_seed(0), weights=None, nothing downloaded) has the
weight of every Linear and Conv layer pruned to 50% with
NDWeightNormSparsifier (torch_sparsity.sparsifiers.prune_with_weight_norm).
From that one pruned model come four inference variants, all in eval():

- eager: the torch.ao.pruning model itself, FakeSparsity parametrizations
  live (every forward computes mask * weight in Python);
- traced: torch.jit.trace of the eager model (traced once with a batch-1
  input, check_trace off; the trace keeps the parametrizations' mask * weight
  as graph ops, so masks stay live there too; reused at every batch, where the
  output check below verifies it);
- scripted: torch.jit.script(convert(model)), the plugin's FakeSparsity with
  its inference cache (masks live);
- squashed: another torch.jit.script(convert(model)) after squash(): plain
  weights already multiplied by their masks, no masks (the floor).

Before any timing, every variant's output at each batch is compared with the
eager model's on the same input; the largest absolute difference is printed
and the run stops if it exceeds 1e-4 * max(1, max |eager output|).

Inference: torch.no_grad(), input N x 3 x 224 x 224. Every variant first runs
3 times at batch 1 (TorchScript's profiling executor optimizes a graph on its
third run), then once at each batch for the output check. Timed samples are
taken in rounds, each round one sample of every variant in a new random order
(as scripts/benchmarks/bench_op.py's interleaved_samples, with a time bound): rounds run
until --repeat rounds, or until --budget seconds have passed and at least
--min-rounds rounds are done. A sample is as many forwards as take about
20 ms (one for all but the smallest configurations), reported per forward;
a sample of one forward (and every training step) comes right after an
untimed call of the same variant, so that no variant pays for what the one
before it left (see timed_rounds). Times are medians over rounds; a ratio is the median over rounds of that
round's ratio (bench_op.paired_ratio), so both sides ran moments apart.

Memory, for each inference variant:

- tensors MiB: the bytes of the storages of the model's parameters, buffers
  and masks (the parametrizations' mask buffers; the FakeSparsity objects'
  masks for the scripted model), each storage counted once. "masks MiB" is
  the masks' part, sum of numel * element_size. The traced model shares its
  tensors with the eager model; each is counted for its own model.
- cache MiB (scripted only): what the FakeSparsity inference cache holds after
  the first no-grad forward: one masked weight per pruned tensor (numel *
  result element size), computed, not measured.
- peak +MiB at batch N: the increase of the process's peak resident memory
  (VmHWM) over its resident memory (VmRSS) just before a few inferences
  (3, or as many as fit in 2 s, at least 1) of an already warmed-up variant.
  Before each measurement the scripted model's caches are cleared
  (clear_cache()), so the first inference builds the cache and the peak
  includes it; glibc's free memory is handed back (malloc_trim(0)) and the
  peak is reset by writing 5 to /proc/self/clear_refs. It is what running the
  model adds on top of holding it: activations, the eager and traced models'
  mask * weight temporaries, the plugin's cache.
- kept +MiB: resident memory after those inferences (after malloc_trim)
  minus before: what the inferences leave allocated (for the scripted model,
  its cache). Measured at the first batch of --batches.

Where /proc/self/clear_refs cannot reset VmHWM, the peak columns say n/a.

Training step: forward, cross-entropy against random labels, backward,
torch.optim.SGD(lr=0.01, momentum=0.9) step on the model's parameters (the
originals: the parametrization's `original`, the converted model's
`T_original`), zero_grad(set_to_none=True) first. The eager parametrized model
against the scripted plugin model, both in train() mode (BatchNorm uses batch
statistics and updates its running statistics in both) with dropout
disabled (every nn.Dropout's p set to 0 in the training copies, so both do the
same deterministic thing; only mobilenet_v3_small has a non-zero dropout). One
step from the same start is checked first: the largest difference of the
updated state (weights, BatchNorm statistics) and of the loss is printed.
Then 3 warm-up steps at batch 2 each, and timed rounds as above (one step per
variant per round). Training batch: 32 for resnet18 and mobilenet_v3_small,
8 for vit_b_16 (a step at 32 takes tens of seconds on 2 cores); --train-batch
sets all.

Targets: scripted / squashed <= 1.05 and scripted / eager < 1 at inference;
scripted / eager <= 1 for the training step.

    .venv/bin/python scripts/benchmarks/bench_models.py [--models resnet18,vit_b_16] [--batches 1,32]
        [--repeat 20] [--budget 30] [--threads N] [--no-train] [--no-memory] [--out FILE] [--quick]
"""

import argparse
import copy
import ctypes
import gc
import os
import random
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

# torch 2.14 warns that torch.jit is deprecated on every script and trace.
warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")

import torch_sparsity  # loads the plugin

from bench_op import paired_ratio  # noqa: E402
from torch_sparsity.convert import (  # noqa: E402
    convert,
    converted_name,
    fake_sparsities,
    parametrized_masks,
    squash,
    storage_bytes,
)
from torch_sparsity.sparsifiers import prune_with_weight_norm  # noqa: E402

MODELS = ("resnet18", "mobilenet_v3_small", "vit_b_16")
TRAIN_BATCH = {"resnet18": 32, "mobilenet_v3_small": 32, "vit_b_16": 8}
VARIANTS = ("eager", "traced", "scripted", "squashed")
SPARSITY = 0.5
MIB = 1 << 20


# ------------------------------------------------------------------ models


def build_variants(name: str):
    """The pruned eager model and its scripted and squashed variants (the
    traced one needs an input: see trace)."""
    import torchvision

    torch.manual_seed(0)
    eager = torchvision.models.get_model(name, weights=None).eval()
    prune_with_weight_norm(eager, SPARSITY)
    scripted = torch.jit.script(convert(eager)).eval()
    squashed = squash(torch.jit.script(convert(eager)).eval())
    return eager, scripted, squashed


def trace(eager, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.no_grad():
            return torch.jit.trace(eager, example, check_trace=False)


def model_input(batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=generator)


# ------------------------------------------------------------------ memory


def model_masks(variant: str, model):
    if variant == "eager":
        return list(parametrized_masks(model).values())
    if variant == "traced":  # the parametrizations' buffers, as the trace keeps them
        return [b for n, b in model.named_buffers() if re.search(r"(^|\.)parametrizations\.[^.]+\.0\.mask$", n)]
    if variant in ("scripted", "squashed"):
        return [fs.mask for fs in fake_sparsities(model).values()]
    raise ValueError(variant)


def cache_bytes(model) -> int:
    """What the scripted model's FakeSparsity caches hold after a no-grad
    forward: one masked weight per pruned tensor."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    total = 0
    for fqn, fs in fake_sparsities(model).items():
        original = tensors[fqn + "_original"]
        dtype = torch.promote_types(original.dtype, fs.mask.dtype)
        total += original.numel() * torch.empty((), dtype=dtype).element_size()
    return total


def tensor_figures(variant: str, model):
    masks = model_masks(variant, model)
    tensors = list(model.parameters()) + list(model.buffers()) + masks
    return {
        "tensors": storage_bytes(tensors),
        "masks": sum(m.numel() * m.element_size() for m in masks),
        "cache": cache_bytes(model) if variant == "scripted" else None,
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()


def _trim():
    gc.collect()
    if LIBC is not None:
        LIBC.malloc_trim(0)


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_reset_works() -> bool:
    """Whether writing 5 to /proc/self/clear_refs resets VmHWM here."""
    _trim()
    if not reset_peak():
        return False
    block = bytearray(64 * MIB)
    block[:: 4096] = b"\1" * len(block[:: 4096])
    del block
    _trim()
    high = _status_kib("VmHWM")
    reset_peak()
    return _status_kib("VmHWM") < high - 32 * 1024


def measure_memory(variant: str, model, x, runs: int, peak_ok: bool):
    """Peak resident increase over ``runs`` inferences, and what stays resident."""
    if variant == "scripted":
        for fs in fake_sparsities(model).values():
            fs.clear_cache()
    _trim()
    before = _status_kib("VmRSS")
    reset_peak()
    with torch.no_grad():
        for _ in range(runs):
            model(x)
    peak = _status_kib("VmHWM") if peak_ok else None
    _trim()
    after = _status_kib("VmRSS")
    return {
        "peak": None if peak is None else (peak - before) * 1024,
        "kept": (after - before) * 1024,
    }


# ------------------------------------------------------------------ timing


def timed_rounds(fns: dict, repeat: int, budget: float, min_rounds: int, seed: int = 0, primed: bool = False):
    """Seconds of one call of each function, in rounds: each round calls every
    function once, in a new random order (as bench_op.interleaved_samples,
    without its warm-up, which the callers do). Stops after ``repeat`` rounds,
    or once ``budget`` seconds have passed and ``min_rounds`` rounds are done.

    ``primed``: each timed call comes right after an untimed call of the same
    function, so that what the other variant left behind (freed memory the
    allocator hands back to the system, cold caches) is not charged to it,
    as in a loop that runs one model over and over. Without it, rounds where
    one variant ran first and rounds where it ran second gave per-round
    ratios in two groups, and a median of them that moved by 10% between
    runs."""
    samples = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    start = time.perf_counter()
    for done in range(repeat):
        if done >= min_rounds and time.perf_counter() - start >= budget:
            break
        rng.shuffle(order)
        for name in order:
            if primed:
                fns[name]()
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return samples


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def check(what: str, diff: float, scale: float):
    if not diff <= 1e-4 * max(1.0, scale):  # also catches NaN
        raise SystemExit(f"bench_models.py: {what} differs from the eager model by {diff:.3g} "
                         f"(largest |value| {scale:.3g}): the variants do not compute the same thing")


# --------------------------------------------------------------- inference


def bench_inference(name, variants, batches, args, log):
    """Rows of the inference table, and the memory figures per variant."""
    rows, memory = [], {v: {"batches": {}} for v in variants}
    eager = variants["eager"]
    for variant, model in variants.items():
        memory[variant].update(tensor_figures(variant, model))
    with torch.no_grad():
        warm = model_input(1, 1)
        for model in variants.values():  # the profiling executor's runs
            for _ in range(3):
                model(warm)
    for batch in batches:
        x = model_input(batch, batch)
        with torch.no_grad():
            reference = eager(x)
            diffs, once = {}, {}
            for variant, model in variants.items():
                t0 = time.perf_counter()
                out = model(x)
                once[variant] = time.perf_counter() - t0
                diffs[variant] = max_diff(out, reference)
                check(f"{name} batch {batch}: the {variant} model's output", diffs[variant],
                      reference.abs().max().item())
            del out, reference
        log(f"# {name} batch {batch}: max |output - eager output|: "
            + ", ".join(f"{v} {diffs[v]:.3g}" for v in variants if v != "eager"))
        calls = max(1, round(0.02 / min(once.values())))

        def sample(model):
            for _ in range(calls):
                model(x)

        with torch.no_grad():
            # One forward per sample (large configurations): primed, see timed_rounds.
            samples = timed_rounds({v: (lambda m=m: sample(m)) for v, m in variants.items()},
                                   args.repeat, args.budget, args.min_rounds, primed=calls == 1)
        samples = {v: [t / calls for t in s] for v, s in samples.items()}
        med = {v: statistics.median(s) for v, s in samples.items()}
        rows.append({
            "model": name, "batch": batch, "ms": {v: 1e3 * t for v, t in med.items()},
            "scripted/squashed": paired_ratio(samples["scripted"], samples["squashed"]),
            "scripted/eager": paired_ratio(samples["scripted"], samples["eager"]),
            "traced/eager": paired_ratio(samples["traced"], samples["eager"]),
            "diffs": diffs, "rounds": len(samples["eager"]), "calls": calls,
        })
        log(f"# {name} batch {batch}: {len(samples['eager'])} rounds of {calls} call(s): "
            + ", ".join(f"{v} {1e3 * t:.2f} ms" for v, t in med.items()))
        if not args.no_memory:
            runs = max(1, min(3, int(2.0 / max(once.values()))))
            for variant, model in variants.items():
                memory[variant]["batches"][batch] = measure_memory(variant, model, x, runs, args.peak_ok)
            log(f"# {name} batch {batch}: memory over {runs} inference(s): "
                + ", ".join(f"{v} peak +{fmt_mib(memory[v]['batches'][batch]['peak'])} MiB, kept "
                            f"+{fmt_mib(memory[v]['batches'][batch]['kept'])} MiB" for v in variants))
        del x
        _trim()
    return rows, memory


# ---------------------------------------------------------------- training


def bench_training(name, eager_pruned, batch, args, log):
    start_model = copy.deepcopy(eager_pruned)
    for m in start_model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    models = {
        "eager": copy.deepcopy(start_model).train(),
        "scripted": torch.jit.script(convert(start_model)).train(),
    }
    del start_model
    generator = torch.Generator().manual_seed(1000 + batch)
    x = torch.randn(batch, 3, 224, 224, generator=generator)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    x_warm, labels_warm = x[:2].clone(), labels[:2].clone()
    optimizers = {v: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for v, m in models.items()}

    last_loss = {}

    def step(variant, inputs, targets):
        optimizers[variant].zero_grad(set_to_none=True)
        loss = F.cross_entropy(models[variant](inputs), targets)
        loss.backward()
        optimizers[variant].step()
        last_loss[variant] = loss.detach()
        return last_loss[variant]

    # One step from the same start: the same updated state?
    losses = {v: step(v, x, labels) for v in models}
    eager_state = models["eager"].state_dict()
    scripted_state = models["scripted"].state_dict()
    state_diff, scale = 0.0, 0.0
    for key, value in eager_state.items():
        if re.search(r"(^|\.)parametrizations\.[^.]+\.\d+\.mask$", key):
            continue  # the masks: not in the converted model's state dict
        other = scripted_state[converted_name(key)]
        if value.is_floating_point():
            state_diff = max(state_diff, max_diff(value, other))
            scale = max(scale, value.abs().max().item())
        elif not torch.equal(value, other):
            state_diff = float("inf")
    loss_diff = abs(losses["eager"].item() - losses["scripted"].item())
    check(f"{name} training step: the scripted model's updated state", state_diff, scale)
    check(f"{name} training step: the scripted model's loss", loss_diff, losses["eager"].item())
    log(f"# {name} training batch {batch}: after one step from the same start, max |scripted - eager| "
        f"over the state: {state_diff:.3g}, loss {loss_diff:.3g} (loss {losses['eager'].item():.4f})")
    for _ in range(3):  # warm-up at batch 2: the profiling executor's runs
        for v in models:
            step(v, x_warm, labels_warm)
    samples = timed_rounds({v: (lambda v=v: step(v, x, labels)) for v in models},
                           args.repeat, args.budget, args.min_rounds, seed=1, primed=True)
    med = {v: statistics.median(s) for v, s in samples.items()}
    for v, loss in last_loss.items():
        loss = loss.item()
        if loss != loss or abs(loss) == float("inf"):
            raise SystemExit(f"bench_models.py: {name} training: the {v} model's loss became {loss}")
    log(f"# {name} training batch {batch}: {len(samples['eager'])} rounds: "
        + ", ".join(f"{v} {1e3 * t:.1f} ms" for v, t in med.items()))
    return {
        "model": name, "batch": batch, "ms": {v: 1e3 * t for v, t in med.items()},
        "scripted/eager": paired_ratio(samples["scripted"], samples["eager"]),
        "state_diff": state_diff, "loss_diff": loss_diff, "rounds": len(samples["eager"]),
    }


# ------------------------------------------------------------------ output


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 1000 else f"{ms:.0f}"


def fmt_mib(nbytes) -> str:
    if nbytes is None:
        return "n/a"
    text = f"{nbytes / MIB:.1f}"
    return "0.0" if text == "-0.0" else text


def fmt_diff(d: float) -> str:
    return "0" if d == 0 else f"{d:.1e}"


def inference_table(rows):
    lines = [
        "| model | batch | eager ms | traced ms | scripted ms | squashed ms | scripted / squashed "
        "| scripted / eager | traced / eager | max diff traced / scripted / squashed | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        ms, d = r["ms"], r["diffs"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {fmt_ms(ms['eager'])} | {fmt_ms(ms['traced'])} | "
            f"{fmt_ms(ms['scripted'])} | {fmt_ms(ms['squashed'])} | {r['scripted/squashed']:.3f} | "
            f"{r['scripted/eager']:.3f} | {r['traced/eager']:.3f} | "
            f"{fmt_diff(d['traced'])} / {fmt_diff(d['scripted'])} / {fmt_diff(d['squashed'])} | {r['rounds']} |"
        )
    return lines


def memory_table(memory_by_model, batches):
    head = "| model | variant | tensors MiB | masks MiB | cache MiB | " + " | ".join(
        f"peak +MiB, batch {b}" for b in batches) + f" | kept +MiB, batch {batches[0]} |"
    lines = [head, "|---|---|" + "---:|" * (4 + len(batches))]
    for name, memory in memory_by_model:
        for variant, m in memory.items():
            peaks = " | ".join(fmt_mib(m["batches"][b]["peak"]) for b in batches)
            cache = "-" if m["cache"] is None else fmt_mib(m["cache"])
            lines.append(f"| {name} | {variant} | {fmt_mib(m['tensors'])} | {fmt_mib(m['masks'])} | {cache} | "
                         f"{peaks} | {fmt_mib(m['batches'][batches[0]]['kept'])} |")
    return lines


def training_table(rows):
    lines = [
        "| model | batch | eager ms | scripted ms | scripted / eager | max diff of state after one step | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {fmt_ms(r['ms']['eager'])} | {fmt_ms(r['ms']['scripted'])} | "
                     f"{r['scripted/eager']:.3f} | {fmt_diff(r['state_diff'])} | {r['rounds']} |")
    return lines


def targets(inference_rows, training_rows):
    lines = []
    for r in inference_rows:
        within = "yes" if r["scripted/squashed"] <= 1.05 else "no"
        faster = "yes" if r["scripted/eager"] < 1 else "no"
        lines.append(f"- {r['model']} batch {r['batch']}: scripted within 5% of squashed: {within} "
                     f"({r['scripted/squashed']:.3f}); faster than eager: {faster} ({r['scripted/eager']:.3f})")
    for r in training_rows:
        ok = "yes" if r["scripted/eager"] <= 1 else "no"
        lines.append(f"- {r['model']} training batch {r['batch']}: no slower than eager: {ok} "
                     f"({r['scripted/eager']:.3f})")
    return lines


def load_line(when: str) -> str:
    load = os.getloadavg()
    return f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at {when}"


# -------------------------------------------------------------------- main


def parse_list(text, convert_item, what):
    try:
        items = [convert_item(t) for t in text.split(",") if t]
    except ValueError:
        raise SystemExit(f"bench_models.py: {what}: cannot read {text!r}") from None
    if not items:
        raise SystemExit(f"bench_models.py: {what}: empty")
    return items


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--batches", default="1,32", help="inference batch sizes (default 1,32)")
    parser.add_argument("--repeat", type=int, default=20, help="most timed rounds per configuration (default 20)")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds of timed rounds per configuration after which no new round starts, once "
                        "--min-rounds are done (default 30)")
    parser.add_argument("--min-rounds", type=int, default=3, help="fewest timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="training batch for every model (default: 32, 8 for vit_b_16)")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--out", metavar="FILE", help="also write the tables (markdown) to FILE")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 rounds, no time budget, training batch 2")
    args = parser.parse_args(argv)
    models = parse_list(args.models, str, "--models")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    batches = parse_list(args.batches, int, "--batches")
    if any(b <= 0 for b in batches):
        parser.error("--batches: sizes must be positive")
    if args.quick:
        args.repeat, args.budget, args.min_rounds = 2, 0.0, 2
        args.train_batch = args.train_batch or 2
    if args.repeat < 1 or args.min_rounds < 1:
        parser.error("--repeat and --min-rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.peak_ok = not args.no_memory and peak_reset_works()

    started = time.perf_counter()
    header = [
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, models pruned to {SPARSITY:.0%} "
        f"(NDWeightNormSparsifier, random weights), CPU, {load_line('start')}",
        f"# timed rounds per configuration: at most {args.repeat}, at least {args.min_rounds}, "
        f"no new round after {args.budget:g} s",
    ]
    for line in header:
        print(line, flush=True)
    if not args.no_memory and not args.peak_ok:
        print("# /proc/self/clear_refs does not reset VmHWM here: no peak memory figures", flush=True)

    def log(line):
        print(line, flush=True)

    inference_rows, memory_by_model, training_rows = [], [], []
    for name in models:
        t0 = time.perf_counter()
        eager, scripted, squashed = build_variants(name)
        traced = trace(eager, model_input(1, 1))
        masks = [fs.mask for fs in fake_sparsities(scripted).values()]
        dtypes = ", ".join(sorted({str(m.dtype).replace("torch.", "") for m in masks}))
        log(f"# {name}: {len(masks)} pruned tensors ({dtypes} masks), variants built in "
            f"{time.perf_counter() - t0:.1f} s")
        variants = {"eager": eager, "traced": traced, "scripted": scripted, "squashed": squashed}
        rows, memory = bench_inference(name, variants, batches, args, log)
        inference_rows += rows
        if not args.no_memory:
            memory_by_model.append((name, memory))
        del variants, traced, scripted, squashed
        _trim()
        if not args.no_train:
            batch = args.train_batch or TRAIN_BATCH[name]
            training_rows.append(bench_training(name, eager, batch, args, log))
        del eager
        _trim()
        log(f"# {name}: done in {time.perf_counter() - t0:.0f} s")

    tables = ["", "Inference, torch.no_grad() (ms per forward; ratios: medians of per-round ratios):", ""]
    tables += inference_table(inference_rows)
    if memory_by_model:
        tables += ["", "Memory (MiB = 2^20 bytes; peak: VmHWM over VmRSS before, warmed models):", ""]
        tables += memory_table(memory_by_model, batches)
    if training_rows:
        tables += ["", "Training step (forward, cross-entropy, backward, SGD momentum step; train() mode, "
                   "dropout off):", ""]
        tables += training_table(training_rows)
    tables += ["", "Targets:", ""] + targets(inference_rows, training_rows)
    footer = [f"# {load_line('end')}; took {time.perf_counter() - started:.0f} s"]
    for line in tables + footer:
        print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(header + tables + footer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
