"""The coupled channel groups ``ChannelPruner`` masks, from the channel
analysis behind ``shrink`` (``channels.py``): which channels of a model go
together, every slice each one has in the model's tensors, and whether
masking a channel whole makes it one that ``shrink`` removes exactly.

That last question is answered by the analysis itself: it runs again on a
copy in which every slice the pruner would mask is zero, and a group is
pruned only if each of its channels then goes. Channels are independent of
each other there (an operation that mixes them keeps them), so this holds
for any subset of them that the pruner masks."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from .shrink_tensors import masked_tensors, plain_copy
from .shrinking import channel_plan

__all__ = ["ENTRIES", "LAYERS", "ROWS", "PruningGroup", "find_groups", "mask_kind"]

Slice = Tuple[str, int, int]  # (tensor fqn, dim, index)
ROWS, ENTRIES = "rows", "entries"  # FakeStructuredSparsity of a weight's output channels; FakeSparsity
LAYERS = (nn.Linear, nn.modules.conv._ConvNd)  # the layers whose output channels the pruner masks


@dataclass
class PruningGroup:
    """Coupled channels: the Conv/Linear weights that make them
    (``producers``), per channel its slices (tensor fqn, dim, index), how
    many channels the last ``step`` masked, and ``reason`` why the group is
    left alone (None when the pruner prunes it)."""

    producers: List[str]
    channels: List[List[Slice]]
    reason: Optional[str] = None
    pruned: int = 0


def _split(fqn: str) -> Tuple[str, str]:
    module, _, name = fqn.rpartition(".")
    return module, name


def mask_kind(model: nn.Module, fqn: str, dim: int) -> Optional[str]:
    """How a slice of ``fqn`` along ``dim`` is masked: ROWS (a Conv/Linear
    weight's output channels), ENTRIES (any other parameter), or None (a
    Conv/Linear weight's input columns, which read a channel that is zero
    anyway, or a buffer such as BatchNorm's running statistics)."""
    module_fqn, name = _split(fqn)
    module = model.get_submodule(module_fqn)
    if name not in module._parameters:
        return None
    if isinstance(module, LAYERS) and name == "weight":
        return ROWS if dim == 0 else None
    return ENTRIES


def _components(analysis) -> Tuple[Dict[int, List[Slice]], Dict[int, List[int]], Dict[int, List[str]]]:
    """Per channel (union-find root) its slices; per group its channels and producers."""
    channel_slices: Dict[int, List[Slice]] = {}
    for (fqn, dim), ids in analysis.slices.items():
        for index, root in enumerate(analysis.roots(ids).tolist()):
            channel_slices.setdefault(root, []).append((fqn, dim, index))
    component = analysis.components()
    channels: Dict[int, List[int]] = {}
    for root in channel_slices:
        channels.setdefault(component[analysis.space[root]], []).append(root)
    producers: Dict[int, List[str]] = {}
    for weight, ids in analysis.produced.items():
        producers.setdefault(component[analysis.space[int(ids[0])]], []).append(weight)
    return channel_slices, channels, producers


def _zero_slices(model: nn.Module, groups: List[PruningGroup]) -> Tuple[nn.Module, Set[str]]:
    """A plain copy of ``model`` with every slice the groups would mask
    zero, and the fqns of the tensors that would hold a mask."""
    plain = plain_copy(model)
    tensors = dict(plain.named_parameters(remove_duplicate=False))
    masked = set()
    with torch.no_grad():
        for group in groups:
            for channel in group.channels:
                for fqn, dim, index in channel:
                    if mask_kind(model, fqn, dim):
                        tensors[fqn].select(dim, index).zero_()
                        masked.add(fqn)
    return plain, masked


def find_groups(model: nn.Module, inputs: tuple, allowed: Set[str]) -> List[PruningGroup]:
    """The channel groups of ``model`` on ``inputs`` (a tuple). A group is
    pruned only if every Conv/Linear weight whose rows it holds is in
    ``allowed``, no tensor of it carries a mask already, and masking its
    channels makes ``shrink`` remove them; else its ``reason`` says why not."""
    analysis = channel_plan(model, inputs)[0]
    channel_slices, channels, producers = _components(analysis)
    already = masked_tensors(model)
    groups = []
    for component, roots in channels.items():
        group = PruningGroup(producers.get(component, []), [channel_slices[root] for root in roots])
        outside = [p for p in group.producers if p not in allowed]
        if outside:
            group.reason = f"{outside[0]} is not in the config"
        for fqn, dim, _ in (s for channel in group.channels for s in channel):
            if group.reason:
                break
            if fqn in already:
                group.reason = f"{fqn} carries a mask already"
            elif mask_kind(model, fqn, dim) == ROWS and fqn not in allowed:
                group.reason = f"{fqn} is not in the config"
        groups.append(group)
    candidates = [g for g in groups if g.reason is None]
    if not candidates:
        return groups
    plain, masked = _zero_slices(model, candidates)
    check, removed, kept, _ = channel_plan(plain, inputs, frozenset(masked))
    for group in candidates:
        for fqn, dim, index in (s for channel in group.channels for s in channel):
            ids = check.slices.get((fqn, dim))
            root = check.find(int(ids[index])) if ids is not None else None
            if root not in removed:
                group.reason = kept.get(root, f"the analysis of the masked model lost {fqn}")
                break
    return groups
