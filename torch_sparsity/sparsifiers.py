"""torch.ao.pruning sparsifiers: ``ChannelPruner``, which masks coupled
channel groups whole so that ``shrink`` removes them exactly
(docs/channel_pruner.md), and the weight-norm helpers the converter's command
line, the demo and the tests use. All leave torch.ao.pruning's
parametrizations in the model, exactly as a sparsifier's ``prepare`` does."""

import math
import warnings
from types import SimpleNamespace
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier, WeightNormSparsifier
from torch.ao.pruning._experimental.pruner.parametrization import FakeStructuredSparsity
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize

from .channel_groups import LAYERS, PruningGroup, find_groups, mask_kind
from .shrinking import example_tuple

__all__ = ["ChannelPruner", "NDWeightNormSparsifier", "prepare_with_masks", "prune_with_weight_norm"]


class NDWeightNormSparsifier(WeightNormSparsifier):
    """torch.ao.pruning's WeightNormSparsifier for tensors of any rank.

    WeightNormSparsifier computes masks for 2-D tensors (a Linear weight); a
    Conv2d weight makes it fail. This one hands it every other tensor viewed as
    2-D, (size of dim 0, the other dims flattened), the way a convolution's
    weight is laid out as a matrix (a vector as one row), and copies the mask it computes back into
    the real mask in place (keeping the mask's identity and dtype). Blocks of
    ``sparse_block_shape`` therefore run along the flattened dims.
    """

    def update_mask(self, module, tensor_name, **kwargs):
        tensor = getattr(module, tensor_name)
        if tensor.dim() == 2:
            return super().update_mask(module, tensor_name, **kwargs)
        mask = module.parametrizations[tensor_name][0].mask
        rows = tensor.shape[0] if tensor.dim() > 2 else 1  # a vector is one row
        flat_mask = mask.detach().reshape(rows, -1).clone()
        # What the parent's update_mask reads from a module: the tensor and
        # the mask of its FakeSparsity.
        flat_module = SimpleNamespace(
            parametrizations=SimpleNamespace(**{tensor_name: [SimpleNamespace(mask=flat_mask)]}),
            **{tensor_name: tensor.reshape(rows, -1)},
        )
        super().update_mask(flat_module, tensor_name, **kwargs)
        new_mask = flat_module.parametrizations.__dict__[tensor_name][0].mask
        mask.copy_(new_mask.reshape(mask.shape))


def prune_with_weight_norm(model: nn.Module, sparsity_level: float, **sparsifier_args) -> NDWeightNormSparsifier:
    """Prunes the weight of every Linear and ConvNd of ``model`` (in place) to
    ``sparsity_level`` with (ND)WeightNormSparsifier: prepare and one step.
    Returns the sparsifier, whose masks stay live in the model."""
    layer_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    config = [
        {"tensor_fqn": f"{name}.weight" if name else "weight"}
        for name, module in model.named_modules()
        if isinstance(module, layer_types)
    ]
    sparsifier = NDWeightNormSparsifier(sparsity_level=sparsity_level, **sparsifier_args)
    sparsifier.prepare(model, config)
    sparsifier.step()
    return sparsifier


def prepare_with_masks(model: nn.Module, masks: Dict[str, torch.Tensor]) -> nn.Module:
    """Parametrizes, in place, each tensor named in ``masks`` (tensor fqn ->
    mask) with torch.ao.pruning's FakeSparsity holding that very mask, as
    ``BaseSparsifier.prepare`` does with a config's ``mask``. Returns ``model``."""
    for tensor_fqn, mask in masks.items():
        module_fqn, _, tensor_name = tensor_fqn.rpartition(".")
        try:
            module = model.get_submodule(module_fqn)
        except AttributeError:
            raise ValueError(f"mask for '{tensor_fqn}': the model has no module '{module_fqn}'") from None
        tensor = getattr(module, tensor_name, None)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"mask for '{tensor_fqn}': module '{module_fqn}' has no tensor '{tensor_name}'")
        if mask.shape != tensor.shape:
            raise ValueError(
                f"mask for '{tensor_fqn}' has shape {tuple(mask.shape)}, the tensor {tuple(tensor.shape)}"
            )
        parametrize.register_parametrization(module, tensor_name, FakeSparsity(mask))
    return model


class ChannelPruner(BaseSparsifier):
    """A torch.ao.pruning sparsifier that masks coupled channel groups whole
    (docs/channel_pruner.md).

    ``prepare(model, config)`` finds, from the model's ``torch.export``
    graph on ``example_inputs``, which output channels go together (a
    residual stream, a depthwise convolution and what feeds it, ...), the
    same analysis as ``shrink``. ``config`` lists the Conv/Linear weights
    (``{"tensor_fqn": ...}``) whose output channels may be pruned; None
    means every Conv/Linear weight. ``step()`` ranks each group's channels
    by the L1 (``norm="l2"``: L2) norm of all their parameter slices and
    masks the lowest ``sparsity_level`` fraction: weight rows with
    ``FakeStructuredSparsity``, biases and normalization weights and biases
    with ``FakeSparsity``, so the masked channels are exactly zero and
    ``shrink`` removes them exactly. A group's level is the lowest of its
    weights' config entries (those torch.ao.pruning's schedulers drive).

    Options: ``norm`` ("l1" or "l2"), ``global_pruning`` (one ranking of
    every channel, by its mean magnitude, instead of one per group), and
    ``round_to`` (each group keeps a multiple of that many channels). A group
    that cannot be masked exactly (LayerNorm over its channels, an operation
    the analysis does not follow, a weight not in the config, the model's
    output) is left alone; ``report()`` says which and why.
    """

    def __init__(self, example_inputs, sparsity_level: float = 0.5, *, norm: str = "l1",
                 global_pruning: bool = False, round_to: int = 1, **defaults):
        if not 0.0 <= sparsity_level <= 1.0:
            raise ValueError(f"sparsity_level must be within [0, 1], got {sparsity_level}")
        if norm not in ("l1", "l2"):
            raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
        if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
            raise ValueError(f"round_to must be a positive int, got {round_to!r}")
        super().__init__(defaults={**defaults, "sparsity_level": sparsity_level})
        self.example_inputs = example_tuple(example_inputs)
        self.norm, self.global_pruning, self.round_to = norm, global_pruning, round_to
        self.channel_groups: List[PruningGroup] = []

    def prepare(self, model: nn.Module, config: Optional[list]) -> None:
        if config is None:
            config = [{"tensor_fqn": f"{fqn}.weight" if fqn else "weight"}
                      for fqn, module in model.named_modules() if isinstance(module, LAYERS)]
        allowed, modules = set(), dict(model.named_modules())
        for entry in config:
            fqn = entry.get("tensor_fqn") if isinstance(entry, dict) else None
            module_fqn, _, name = (fqn or "").rpartition(".")
            module = modules.get(module_fqn)
            if not isinstance(module, LAYERS) or name != "weight":
                raise ValueError(f"ChannelPruner's config names Conv/Linear weights ({{'tensor_fqn': "
                                 f"'conv.weight'}}), got {entry!r}")
            if parametrize.is_parametrized(module, "weight"):
                raise ValueError(f"{fqn} is parametrized already; ChannelPruner adds its own mask")
            if fqn in allowed:  # a second entry would stack a second mask that no step updates
                raise ValueError(f"{fqn} is twice in ChannelPruner's config")
            level = entry.get("sparsity_level", 0.0)
            if not 0.0 <= level <= 1.0:
                raise ValueError(f"sparsity_level of {fqn} must be within [0, 1], got {level}")
            allowed.add(fqn)
        self.channel_groups = find_groups(model, self.example_inputs, allowed)
        left_alone = [g for g in self.channel_groups if g.reason and set(g.producers) & allowed]
        if left_alone:
            warnings.warn(f"ChannelPruner leaves {len(left_alone)} channel group(s) of config weights unpruned "
                          f"(report() lists them), first {left_alone[0].producers[0]}: {left_alone[0].reason}")
        super().prepare(model, config)

    def _prepare(self, *args, **kwargs) -> None:
        """Registers a row mask on every config weight and an entry mask on
        every other parameter a pruned group holds a slice of."""
        # Per mask and per scored parameter, its (dim, index, channel number) triples.
        slices = []
        for number, channel in enumerate(c for group in self.pruned_groups() for c in group.channels):
            for fqn, dim, index in channel:
                slices.append((fqn, dim, index, number, mask_kind(self.model, fqn, dim), self._is_parameter(fqn)))
        self._channel_count = sum(len(group.channels) for group in self.pruned_groups())
        self._masks: Dict[str, torch.Tensor] = {}
        for config in self.groups:
            weight = getattr(config["module"], config["tensor_name"])
            self._register(config["tensor_fqn"], FakeStructuredSparsity,
                           torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device))
        self._mask_slices: Dict[tuple, list] = {}
        self._score_slices: Dict[tuple, list] = {}
        for fqn, dim, index, number, kind, is_parameter in slices:
            if kind is not None:
                if fqn not in self._masks:
                    self._register(fqn, FakeSparsity, torch.ones_like(self._tensor(fqn)))
                self._mask_slices.setdefault((fqn, dim), []).append((index, number))
            if is_parameter:
                self._score_slices.setdefault((fqn, dim), []).append((index, number))

    def _register(self, fqn: str, parametrization, mask: torch.Tensor) -> None:
        module_fqn, _, name = fqn.rpartition(".")
        parametrize.register_parametrization(self.model.get_submodule(module_fqn), name, parametrization(mask))
        self.state[fqn]["mask"] = self._masks[fqn] = mask

    def _tensor(self, fqn: str) -> torch.Tensor:
        module_fqn, _, name = fqn.rpartition(".")
        return getattr(self.model.get_submodule(module_fqn), name)

    def _is_parameter(self, fqn: str) -> bool:
        module_fqn, _, name = fqn.rpartition(".")
        return name in self.model.get_submodule(module_fqn)._parameters

    def pruned_groups(self) -> List[PruningGroup]:
        """The channel groups the pruner prunes, in the order of its channel numbers."""
        return [group for group in self.channel_groups if group.reason is None]

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs) -> None:
        """Every mask at once: a layer's channels are ranked with the rest of
        their group, so no mask is computed alone. ``step()`` calls it once."""
        self._update_masks()

    def __getstate__(self) -> dict:
        # BaseSparsifier keeps only defaults, state and groups; the groups and
        # masks found by prepare go too, so a deep copy still steps.
        return dict(self.__dict__)

    def step(self, use_path: bool = True) -> None:
        if not hasattr(self, "_masks"):
            raise RuntimeError("ChannelPruner.step needs a prepared pruner: call prepare(model, config) first")
        if self.enable_mask_update:
            with torch.no_grad():
                self._update_masks()

    def _scores(self) -> np.ndarray:
        """Per channel its L1 (or squared L2) norm; the mean per entry with one global ranking."""
        score, size = np.zeros(self._channel_count), np.zeros(self._channel_count)
        for (fqn, dim), slices in self._score_slices.items():
            index, number = (np.array(column) for column in zip(*slices))
            tensor = self._tensor(fqn).detach().movedim(dim, 0)
            magnitude = tensor.abs() if self.norm == "l1" else tensor.square()
            per_index = magnitude.reshape(tensor.shape[0], -1).sum(1).to(torch.float64).cpu().numpy()
            np.add.at(score, number, per_index[index])
            np.add.at(size, number, tensor[0].numel())
        return score / np.maximum(size, 1) if self.global_pruning else score

    def _keep_count(self, count: int, level: float) -> int:
        keep = count - int(level * count)
        return max(1, min(count, math.ceil(keep / self.round_to) * self.round_to))

    def _update_masks(self) -> None:
        levels = {config["tensor_fqn"]: config["sparsity_level"] for config in self.groups}
        score = self._scores()
        pruned = np.zeros(self._channel_count, dtype=bool)
        start, spans = 0, []
        for group in self.pruned_groups():
            level = min(levels[p] for p in group.producers)
            spans.append((group, start, start + len(group.channels), level))
            start += len(group.channels)
        if self.global_pruning:
            self._rank_globally(score, pruned, spans)
        else:
            for group, begin, end, level in spans:
                keep = self._keep_count(end - begin, level)
                order = np.argsort(score[begin:end], kind="stable")
                pruned[begin + order[:end - begin - keep]] = True
        for group, begin, end, _ in spans:
            group.pruned = int(pruned[begin:end].sum())
        for fqn, mask in self._masks.items():
            mask.fill_(True if mask.dtype == torch.bool else 1)
        for (fqn, dim), slices in self._mask_slices.items():
            index = [i for i, number in slices if pruned[number]]
            if index:
                mask = self._masks[fqn]
                mask.index_fill_(dim, torch.tensor(index, device=mask.device), 0)

    def _rank_globally(self, score: np.ndarray, pruned: np.ndarray, spans: list) -> None:
        """Masks the lowest channels of all groups together, each group
        keeping at least one (or ``round_to``), then rounds each group's kept
        count up to a multiple of ``round_to``."""
        if not spans:
            return
        level = min(level for *_, level in spans)
        group_of = np.concatenate([np.full(end - begin, i) for i, (_, begin, end, _) in enumerate(spans)])
        left = np.array([end - begin for _, begin, end, _ in spans])
        target = int(level * len(score))
        for number in np.argsort(score, kind="stable").tolist():
            if target == 0:
                break
            g = group_of[number]
            if left[g] > min(self.round_to, spans[g][2] - spans[g][1]):
                pruned[number], left[g], target = True, left[g] - 1, target - 1
        for g, (_, begin, end, _) in enumerate(spans):
            keep = min(end - begin, math.ceil(left[g] / self.round_to) * self.round_to)
            restore = keep - left[g]
            if restore:
                back = [n for n in np.argsort(-score[begin:end], kind="stable") + begin if pruned[n]][:restore]
                pruned[back] = False

    def report(self) -> str:
        """Per channel group: its first producer, channels, how many the last
        step masked, and why a group is left alone."""
        lines = []
        for group in self.channel_groups:
            others = len(group.producers) - 1
            name = (group.producers[0] if group.producers else "?") + (f" (+{others})" if others else "")
            status = f"{group.pruned} masked" if group.reason is None else f"left alone: {group.reason}"
            lines.append(f"{name}: {len(group.channels)} channels, {status}")
        return "\n".join(lines)

    def squash_mask(self, *args, **kwargs) -> None:
        """Removes every mask the pruner registered, leaving the masked values
        in the tensors (torch.ao.pruning's ``squash_mask``)."""
        for fqn in self._masks:
            # Removing a parametrization edits the module's parametrized class, which
            # deep copies of the model share: each module gets a class of its own first.
            module = self.model.get_submodule(fqn.rpartition(".")[0])
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        super().squash_mask(*args, **kwargs)
        weights = {config["tensor_fqn"] for config in self.groups}
        for fqn in self._masks:
            if fqn not in weights:
                module_fqn, _, name = fqn.rpartition(".")
                parametrize.remove_parametrizations(self.model.get_submodule(module_fqn), name,
                                                    leave_parametrized=True)

    def state_dict(self) -> dict:
        """torch.ao.pruning's state dict, its per-tensor state a plain dict
        (not a defaultdict), so that torch.load loads it with weights_only."""
        state = super().state_dict()
        state["state"] = {fqn: dict(entry) for fqn, entry in state["state"].items()}
        return state

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """The masks and levels of ``state_dict()``, copied into this prepared
        pruner's masks (in place: the model keeps them live)."""
        if not hasattr(self, "_masks"):
            raise RuntimeError("ChannelPruner.load_state_dict needs a prepared pruner: call prepare(model, config) "
                               "with the same model and config first")
        masks = {fqn: state.get("mask") for fqn, state in state_dict["state"].items()}
        unknown, missing = set(masks) - set(self._masks), set(self._masks) - set(masks)
        if strict and (unknown or missing):
            raise ValueError(f"the state dict's masks do not match the pruner's: unknown {sorted(unknown)}, "
                             f"missing {sorted(missing)}")
        for fqn, mask in masks.items():
            if fqn in self._masks and mask is not None and mask.shape != self._masks[fqn].shape:
                raise ValueError(f"mask of {fqn} has shape {tuple(mask.shape)}, the pruner's "
                                 f"{tuple(self._masks[fqn].shape)}")
        levels = {group["tensor_fqn"]: group for group in state_dict["groups"]}
        with torch.no_grad():
            for fqn, mask in masks.items():
                if fqn in self._masks and mask is not None:
                    self._masks[fqn].copy_(mask)
        for config in self.groups:
            if config["tensor_fqn"] in levels:
                config["sparsity_level"] = levels[config["tensor_fqn"]]["sparsity_level"]
        for group in self.pruned_groups():  # report() counts the loaded masks
            fqn = group.producers[0]
            rows = [index for channel in group.channels for name, dim, index in channel if name == fqn and dim == 0]
            group.pruned = int((~self._masks[fqn][rows]).sum())
