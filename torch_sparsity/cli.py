"""The command line ``python -m torch_sparsity.convert``: builds an eager
model, prunes it (or takes it pruned), converts and scripts it, saves it with
torch.jit.save, and optionally compares, times and compiles it into an
AOTInductor package. ``--help`` lists the options; docs/end_to_end.md shows
them in use."""

import argparse
import copy
import importlib
import pickle
import re
import sys
import time
from typing import List

import torch
from torch import nn

from . import aoti, load_library
from .channel_groups import LAYERS
from .convert import ConversionError, convert
from .masks import fake_sparsities, mask_bytes, masks, squash
from .shrinking import ShrinkError, shrink_report
from .sources import source_masks
from .sparsifiers import ChannelPruner, prepare_with_masks, prune_with_weight_norm

__all__ = ["main"]


def _build_model(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"--model: expected MODULE:CALLABLE (e.g. torchvision.models:resnet18), got {spec!r}")
    try:
        factory = importlib.import_module(module_name)
        for piece in attribute.split("."):
            factory = getattr(factory, piece)
    except (ImportError, AttributeError) as error:
        raise SystemExit(f"--model: cannot find {spec}: {error}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"--model: {spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _parse_shape(text: str) -> List[int]:
    try:
        shape = [int(piece) for piece in text.split(",")]
    except ValueError:
        raise SystemExit(f"--input-shape: expected comma-separated sizes such as 1,3,224,224, got {text!r}") from None
    if not shape or any(size <= 0 for size in shape):
        raise SystemExit(f"--input-shape: sizes must be positive, got {text!r}")
    return shape


def _load(path: str, option: str, trusted: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as error:
        raise SystemExit(
            f"{option}: {path} holds more than tensors and plain containers; if you trust it, add --trust-files "
            f"({str(error).splitlines()[0]})"
        ) from None
    except OSError as error:
        raise SystemExit(f"{option}: cannot read {path}: {error}") from None


def _describe_masks(masks) -> str:
    """'1.4 MiB, bool' for a dict of masks or FakeSparsity objects."""
    dtypes = sorted({str(getattr(mask, "mask", mask).dtype).replace("torch.", "") for mask in masks.values()})
    return f"{mask_bytes(masks) / 2**20:.1f} MiB, {' and '.join(dtypes) or 'none'}"


def _median_ms(fn, runs: int) -> float:
    with torch.no_grad():
        fn()  # warm-up (TorchScript profiles and optimizes on the first runs)
        fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * times[len(times) // 2]


def _prune_channels(model: nn.Module, level: float, example: torch.Tensor) -> str:
    """Masks ``level`` of the output channels of every Conv/Linear but the
    last Linear (the classifier, whose channels are the model's output) with
    ChannelPruner, prepared on ``example``, one step; returns a summary line."""
    layers = {fqn: module for fqn, module in model.named_modules()
              if isinstance(module, LAYERS)}
    classifier = [fqn for fqn, module in layers.items() if isinstance(module, nn.Linear)][-1:]
    config = [{"tensor_fqn": f"{fqn}.weight" if fqn else "weight"} for fqn in layers if fqn not in classifier]
    pruner = ChannelPruner((example,), level)
    pruner.prepare(model, config)
    pruner.step()
    groups = pruner.pruned_groups()
    return (f"ChannelPruner: {sum(g.pruned for g in groups)} of {sum(len(g.channels) for g in groups)} channels "
            f"masked in {len(groups)} channel groups ({len(pruner.channel_groups) - len(groups)} left alone)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torch_sparsity.convert",
        description="Builds an eager model, prunes it with torch.ao.pruning (or takes it pruned), converts it "
        "for TorchScript with the plugin's FakeSparsity, scripts it and saves it with torch.jit.save.",
    )
    parser.add_argument("--model", required=True, metavar="MODULE:CALLABLE",
                        help="called without arguments, returns the eager model, possibly already pruned "
                        "(e.g. torchvision.models:resnet18)")
    parser.add_argument("--weights", metavar="FILE",
                        help="a state dict (torch.save) to load into the model, either the dense model's or "
                        "the parametrized model's")
    prune = parser.add_mutually_exclusive_group()
    prune.add_argument("--sparsity", type=float, metavar="LEVEL",
                       help="prune the weight of every Linear and Conv layer with WeightNormSparsifier to LEVEL")
    prune.add_argument("--channel-sparsity", type=float, metavar="LEVEL",
                       help="mask LEVEL of the output channels of every Conv and Linear layer but the last Linear "
                       "with ChannelPruner (coupled channels together, on the --input-shape input), so that "
                       "--shrink removes them")
    prune.add_argument("--masks", metavar="FILE",
                       help="torch.save'd masks: {tensor_fqn: mask}, or a sparsifier's state_dict()")
    parser.add_argument("--trust-files", action="store_true",
                        help="load --weights and --masks with torch.load(weights_only=False), which runs "
                        "code from the file: needed for a sparsifier's state_dict() saved as it is (it holds "
                        "a defaultdict)")
    parser.add_argument("--keep-mask-dtype", action="store_true",
                        help="store each mask in the dtype the sparsifier made it (by default masks of 0s and 1s "
                        "are stored as bool, with the same results)")
    parser.add_argument("--output", "-o", required=True, metavar="FILE", help="where to torch.jit.save the model")
    parser.add_argument("--input-shape", metavar="N,C,H,W",
                        help="a random input of this shape to compare the scripted model with the eager one")
    parser.add_argument("--save-input", metavar="FILE", help="torch.save that input (needs --input-shape)")
    parser.add_argument("--save-output", metavar="FILE",
                        help="torch.save the eager parametrized model's output on it (needs --input-shape)")
    parser.add_argument("--benchmark", type=int, default=0, metavar="RUNS",
                        help="time RUNS inferences of the eager parametrized, the scripted and the squashed "
                        "scripted model (needs --input-shape)")
    parser.add_argument("--shrink", action="store_true",
                        help="remove the channels the masks zero (torch_sparsity.shrink, on the --input-shape input) "
                        "and print its report; everything after (saved, compared, timed, compiled) is the shrunk "
                        "model, compared with the masked one")
    parser.add_argument("--aoti-package", metavar="FILE",
                        help="also convert the pruned model with target='export' and compile it into an AOTInductor "
                        "package (torch_sparsity.aoti.compile) for the --input-shape input; sparsity_run reads it")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the input (default 0)")
    args = parser.parse_args(argv)
    for option, level in (("--sparsity", args.sparsity), ("--channel-sparsity", args.channel_sparsity)):
        if level is not None and not 0 <= level <= 1:
            parser.error(f"{option} must be in [0, 1], got {level}")
    if (args.save_input or args.save_output or args.benchmark or args.aoti_package) and not args.input_shape:
        parser.error("--save-input, --save-output, --benchmark and --aoti-package need --input-shape")
    if args.shrink and not args.input_shape:
        parser.error("--shrink needs --input-shape: it finds the channels on an input of that shape")
    if args.channel_sparsity is not None and not args.input_shape:
        parser.error("--channel-sparsity needs --input-shape: it finds the coupled channels on an input of that shape")
    if args.benchmark < 0:
        parser.error("--benchmark must be a number of runs")
    input_shape = _parse_shape(args.input_shape) if args.input_shape else None

    load_library()
    torch.manual_seed(args.seed)
    model = _build_model(args.model).eval()
    # Drawn here, after the model, so the seed gives the same weights and input whatever the pruning.
    example = torch.randn(input_shape) if input_shape else None
    weights = _load(args.weights, "--weights", args.trust_files) if args.weights else None
    parametrized_weights = weights is not None and any(".parametrizations." in k or k.startswith("parametrizations.") for k in weights)
    if weights is not None and not parametrized_weights:
        try:
            model.load_state_dict(weights)
        except RuntimeError as error:
            raise SystemExit(f"--weights: {args.weights} does not fit the model: {error}") from None
    if args.sparsity is not None:
        prune_with_weight_norm(model, args.sparsity)
    elif args.channel_sparsity is not None:
        print(_prune_channels(model, args.channel_sparsity, example))
    elif args.masks:
        given = _load(args.masks, "--masks", args.trust_files)
        if isinstance(given, dict) and "state" in given and "groups" in given:  # a sparsifier's state_dict()
            given = {fqn: state["mask"] for fqn, state in given["state"].items()}
        prepare_with_masks(model, given)
    if parametrized_weights:
        # A parametrized model's state_dict() leaves the masks out (as
        # FakeSparsity wants), but its load_state_dict() asks for them.
        result = model.load_state_dict(weights, strict=False)
        missing = [k for k in result.missing_keys if not re.search(r"(^|\.)parametrizations\.[^.]+\.\d+\.mask$", k)]
        if missing or result.unexpected_keys:
            raise SystemExit(
                f"--weights: {args.weights} does not fit the pruned model: missing {missing}, "
                f"unexpected {result.unexpected_keys}"
            )

    deployed = model
    if args.shrink:
        try:
            report = shrink_report(model, (example,))
        except ShrinkError as error:
            print(f"torch_sparsity.convert: cannot shrink: {error}", file=sys.stderr)
            return 1
        print(report)
        deployed = report.model

    try:
        converted = convert(deployed, compact_masks=not args.keep_mask_dtype)
    except ConversionError as error:
        print(f"torch_sparsity.convert: cannot convert: {error}", file=sys.stderr)
        return 1
    scripted = torch.jit.script(converted)
    scripted.save(args.output)
    sparsities = fake_sparsities(scripted)
    print(f"converted {len(sparsities)} pruned tensors; scripted model saved to {args.output}")
    print(f"masks: {_describe_masks(sparsities)} "
          f"(as the sparsifier made them: {_describe_masks(source_masks(model))})")

    if input_shape:
        with torch.no_grad():
            eager_output = model(example)
            scripted_output = scripted(example)
        print(f"max |scripted - eager| on a random {tuple(example.shape)} input: "
              f"{(scripted_output - eager_output).abs().max().item():.3g}")
        if args.save_input:
            torch.save(example, args.save_input)
        if args.save_output:
            torch.save(eager_output, args.save_output)
        if args.benchmark:
            eager_ms = _median_ms(lambda: model(example), args.benchmark)
            scripted_ms = _median_ms(lambda: scripted(example), args.benchmark)
            squashed = squash(copy.deepcopy(scripted))
            squashed_ms = _median_ms(lambda: squashed(example), args.benchmark)
            print(f"median inference time over {args.benchmark} runs (Python): eager parametrized {eager_ms:.1f} ms, "
                  f"scripted with the plugin {scripted_ms:.1f} ms, scripted and squashed {squashed_ms:.1f} ms")
        if args.aoti_package:
            start = time.perf_counter()
            exportable = convert(deployed, compact_masks=not args.keep_mask_dtype, target="export")
            if masks(exportable):
                aoti.compile(exportable, (example,), args.aoti_package)
            else:  # an unpruned model (a dense baseline): a plain package, which sparsity_run also reads
                program = torch.export.export(exportable, (example,))
                torch._inductor.aoti_compile_and_package(program, package_path=args.aoti_package)
            print(f"AOTInductor package of the same model ({len(masks(exportable))} masks live) saved to "
                  f"{args.aoti_package} (compiled in {time.perf_counter() - start:.0f} s)")
    return 0
