"""``shrink``: where masks zero whole channels, the channels go and the
modules are rebuilt smaller (docs/shrinking.md). The channels come from the
model's ``torch.export`` graph (``channels.py``, ``channel_ops.py``); the
pruned tensors' forms from ``shrink_tensors.py``."""

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from . import load_library
from .channel_ops import analyze
from .channels import CONST, Analysis, Read
from .masks import storage_bytes
from .shrink_tensors import (
    ShrinkError,
    add_to_bias,
    can_slice,
    copy_model,
    masked_tensors,
    plain_copy,
    refresh_prune,
    slice_tensor,
    tensor_shape,
)

__all__ = [
    "ChannelGroup", "Cost", "ShrinkError", "ShrinkReport", "channel_plan", "example_tuple", "shrink", "shrink_report",
]


@dataclass
class Cost:
    """What a model takes: parameters (elements), multiply-adds of its
    Conv/Linear layers on the example inputs, and bytes of its parameters and
    buffers (masks included)."""

    parameters: int
    multiply_adds: int
    bytes: int


@dataclass
class ChannelGroup:
    """Coupled channels: the modules that make them (``producers``), how
    many distinct channels they form, how many went, and for those that
    stayed, the reasons with their counts."""

    producers: List[str]
    channels: int
    removed: int
    kept: Dict[str, int] = field(default_factory=dict)


@dataclass
class ShrinkReport:
    """What ``shrink_report`` returns: the shrunk ``model``, the channel
    ``groups``, the cost ``before`` and ``after``, and per Conv/Linear (fqn)
    the indices of its output channels that went (``removed_channels``)."""

    model: nn.Module
    groups: List[ChannelGroup]
    before: Cost
    after: Cost
    removed_channels: Dict[str, List[int]] = field(default_factory=dict)

    def __str__(self) -> str:
        width = max([len(g.producers[0]) + 8 for g in self.groups] + [13])
        lines = [f"{'channel group':<{width}} channels  removed  kept because"]
        for group in self.groups:
            others = len(group.producers) - 1
            name = group.producers[0] + (f" (+{others})" if others else "")
            reasons = "; ".join(f"{count}: {reason}" for reason, count in group.kept.items())
            lines.append(f"{name:<{width}} {group.channels:>8} {group.removed:>8}  {reasons}")
        for label, key in (("parameters", "parameters"), ("multiply-adds", "multiply_adds"), ("bytes", "bytes")):
            before, after = getattr(self.before, key), getattr(self.after, key)
            ratio = f"{after / before:.3f}" if before else "-"
            lines.append(f"{label:<14} before {before:>14,}  after {after:>14,}  ratio {ratio}")
        return "\n".join(lines)


def example_tuple(example_inputs) -> tuple:
    """``example_inputs`` as a tuple (one Tensor is a tuple of one); ShrinkError if empty."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise ShrinkError(
            "shrink needs example_inputs (a tuple of the model's inputs, or one Tensor): it finds the channels "
            f"from the model's torch.export graph on them; got {type(example_inputs).__name__} {example_inputs!r}"
        )
    return example_inputs


def _export(plain: nn.Module, inputs: tuple):
    plain.eval()
    try:
        with torch.no_grad():
            plain(*inputs)
    except Exception as error:
        raise ShrinkError(f"the model does not run on example_inputs: {type(error).__name__}: {error}") from error
    try:
        return torch.export.export(plain, inputs, strict=False)
    except Exception as error:
        raise ShrinkError(
            f"torch.export cannot capture the model on example_inputs, and shrink reads the channels from its "
            f"graph: {type(error).__name__}: {error}"
        ) from error


def _cost(model: nn.Module, multiply_adds: int) -> Cost:
    parameters = list(model.parameters())
    return Cost(sum(p.numel() for p in parameters), multiply_adds, storage_bytes(parameters + list(model.buffers())))


def _split(fqn: str) -> Tuple[str, str]:
    module, _, name = fqn.rpartition(".")
    return module, name


def _kept_fraction(ids, removed_roots: set, analysis: Analysis) -> float:
    if ids is None or len(ids) == 0:
        return 1.0
    return sum(1 for root in analysis.roots(ids).tolist() if root not in removed_roots) / len(ids)


def channel_plan(model: nn.Module, inputs: tuple, masked: frozenset = frozenset()):
    """The analysis of ``model`` on ``inputs``: (analysis, removed roots,
    kept reasons, tensors of the plain copy by fqn). ``masked`` names
    tensors to treat as masked besides those that are."""
    masked = masked_tensors(model) | set(masked)
    plain = plain_copy(model)
    program = _export(plain, inputs)
    named = list(plain.named_parameters(remove_duplicate=False)) + list(plain.named_buffers(remove_duplicate=False))
    tensors = dict(named)
    modules = dict(plain.named_modules())
    analysis = analyze(program, tensors, modules, masked)
    holders: Dict[int, int] = {}  # a tensor tied between modules would lose the tie when sliced
    for _, tensor in named:
        holders[id(tensor)] = holders.get(id(tensor), 0) + 1
    for (fqn, _), ids in analysis.slices.items():
        module_fqn, name = _split(fqn)
        if module_fqn not in modules or not can_slice(model.get_submodule(module_fqn), name):
            analysis.pin(ids, f"{fqn} is no tensor of a module that shrink can slice")
        elif holders.get(id(tensors.get(fqn)), 0) > 1:
            analysis.pin(ids, f"{fqn} is tied to another module's tensor")
    kept = analysis.decide()
    removed = {analysis.find(e) for e in range(len(analysis.parent))} - set(kept)
    return analysis, removed, kept, tensors


def _folds(analysis: Analysis, removed: set, tensors: Dict[str, torch.Tensor]) -> Dict[Read, torch.Tensor]:
    """Per read, what the constant channels that go add to the reader's bias."""
    deltas: Dict[Read, torch.Tensor] = {}
    for read in analysis.reads:
        roots = analysis.roots(read.flow.ids)
        columns = [i for i, root in enumerate(roots.tolist()) if root in removed and read.flow.kind[i] == CONST]
        if not columns:
            continue
        weight = tensors[read.weight].detach().to(torch.float64).cpu()
        index = torch.tensor(columns)
        values = read.flow.value[index]
        w = weight.index_select(1, index)
        if read.kind == "conv":
            w = w.flatten(2).sum(2)
        deltas[read] = w @ values
    return deltas


def _update_attributes(module: nn.Module, old_in: int) -> None:
    """Conv/Linear/norm attributes that agree with the sliced tensors."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        shape = tensor_shape(module, "weight")
        if module.groups > 1 and module.groups == old_in:  # depthwise: a group per channel
            module.groups = shape[0]
        module.out_channels, module.in_channels = shape[0], shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = tensor_shape(module, "weight")
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = tensor_shape(module, "running_mean" if module.running_mean is not None else "weight")[0]
    elif isinstance(module, nn.GroupNorm):
        per_group = module.num_channels // module.num_groups
        module.num_channels = tensor_shape(module, "weight")[0]
        module.num_groups = module.num_channels // per_group


def shrink_report(model: nn.Module, example_inputs, *, inplace: bool = False) -> ShrinkReport:
    """``shrink``, with the report: which channels went, which stayed and
    why, and the cost before and after. The shrunk model is ``.model``."""
    load_library()
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise ShrinkError(f"shrink expects an eager nn.Module, but got {type(model).__name__}")
    inputs = example_tuple(example_inputs)
    analysis, removed, kept, tensors = channel_plan(model, inputs)
    macs_before = sum(cost[0] for cost in analysis.costs)
    macs_after = sum(round(macs * _kept_fraction(out_ids, removed, analysis) * _kept_fraction(in_ids, removed, analysis))
                     for macs, out_ids, in_ids in analysis.costs)
    before = _cost(model, macs_before)
    target = model if inplace else copy_model(model)
    modules = dict(target.named_modules())
    old_in = {fqn: getattr(m, "in_channels", 0) for fqn, m in modules.items()}
    for read, delta in _folds(analysis, removed, tensors).items():
        add_to_bias(modules[read.module], delta)
        if (read.weight, 0) in analysis.slices:  # a bias made for the fold follows the weight's rows
            analysis.slices.setdefault((read.bias, 0), analysis.slices[(read.weight, 0)])
    touched = set()
    for (fqn, dim), ids in analysis.slices.items():
        roots = analysis.roots(ids)
        keep = np.flatnonzero([root not in removed for root in roots.tolist()])
        if len(keep) == len(ids):
            continue
        module_fqn, name = _split(fqn)
        slice_tensor(modules[module_fqn], name, dim, torch.from_numpy(keep))
        touched.add(module_fqn)
    for module_fqn in touched:
        _update_attributes(modules[module_fqn], old_in[module_fqn])
    refresh_prune(target)
    groups = [ChannelGroup(**group) for group in analysis.groups(kept)]
    removed_channels = {
        _split(weight)[0]: [i for i, root in enumerate(analysis.roots(ids).tolist()) if root in removed]
        for weight, ids in analysis.produced.items() if (weight, 0) in analysis.slices
    }
    return ShrinkReport(target, groups, before, _cost(target, macs_after), removed_channels)


def shrink(model: nn.Module, example_inputs, *, inplace: bool = False) -> nn.Module:
    """``model`` with the channels its masks zero physically gone
    (docs/shrinking.md): the same module tree, Conv/Linear/BatchNorm/GroupNorm
    rebuilt smaller, the masks that remain sliced and live, and outputs equal
    to the masked model's (eval mode; up to summation order). ``example_inputs``
    (a tuple, or one Tensor) is what ``torch.export`` captures the model on.
    With ``inplace=False`` ``model`` stays unchanged. ShrinkError (a
    ValueError) for what it cannot take, before anything changes."""
    return shrink_report(model, example_inputs, inplace=inplace).model
