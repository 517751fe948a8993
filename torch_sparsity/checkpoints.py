"""Checkpoints of the pruned eager model, loaded into the converted one:
``convert`` registers ``load_pruned_checkpoint`` as a load_state_dict
pre-hook of every module it converts (either target), so that
``load_state_dict`` takes the converted model's own state dict and the
pruned model's, strict or not. In the part of the state dict that reaches
the module, for each pruned tensor ``T`` whose mask is held (not squashed):

- ``T_orig`` (torch.nn.utils.prune) and ``parametrizations.T.original``
  (torch.ao.pruning) are renamed ``T_original``, unless that key is there;
- ``T_mask`` (torch.nn.utils.prune) and ``parametrizations.T.0.mask`` (a
  parametrization that keeps its mask in the state dict; torch.ao.pruning's
  own FakeSparsity keeps it out) are taken out and become the live mask, in
  the form ``convert`` gives a mask (``_as_converted``).

A mask that does not fit (shape, a dtype the plugin refuses) is reported in
load_state_dict's error, and then no mask of that module changes.
"""

from typing import Callable, Iterator, List, Tuple

import torch
from torch import nn

from .masks import _pruned_tensor_names, compact_mask
from .naming import MASK_SUFFIX, ORIGINAL_SUFFIX, PRUNE_MASK_SUFFIX, PRUNE_ORIG_SUFFIX, SPARSITY_SUFFIX

__all__ = ["load_pruned_checkpoint"]


def _held_masks(module: nn.Module) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, tensor the mask applies to, live mask) of each pruned tensor of
    a converted module whose mask is held: its FakeSparsity object (target
    "torchscript") or its mask buffer, which is not persistent (target
    "export"; a persistent one is the module's own)."""
    sparsities = _pruned_tensor_names(module)
    for name in sparsities:
        yield name, getattr(module, name + ORIGINAL_SUFFIX), getattr(module, name + SPARSITY_SUFFIX).mask
    for name in _pruned_tensor_names(module, MASK_SUFFIX):
        if name not in sparsities and name + MASK_SUFFIX in module._non_persistent_buffers_set:
            yield name, getattr(module, name + ORIGINAL_SUFFIX), getattr(module, name + MASK_SUFFIX)


def _rename_original(state_dict, prefix: str, name: str) -> None:
    new = prefix + name + ORIGINAL_SUFFIX
    old = [key for key in (prefix + name + PRUNE_ORIG_SUFFIX, f"{prefix}parametrizations.{name}.original")
           if key in state_dict]
    if new not in state_dict and len(old) == 1:
        state_dict[new] = state_dict.pop(old[0])


def _as_converted(mask: torch.Tensor, original: torch.Tensor, live: torch.Tensor, from_prune: bool) -> torch.Tensor:
    """The mask as ``convert`` would hold it: prune's mask in the tensor's
    dtype (prune computes ``mask.to(orig.dtype) * orig``), and compacted to
    bool where the live mask is bool (convert compacted it) and that gives
    the same results."""
    if from_prune and mask.dtype not in (torch.bool, original.dtype) and original.is_floating_point():
        mask = mask.to(dtype=original.dtype)
    if live.dtype == torch.bool:
        mask = compact_mask(mask, original)
    return mask


def _mask_update(module: nn.Module, name: str, key: str, mask, original: torch.Tensor, live: torch.Tensor,
                 from_prune: bool, assign: bool) -> Callable[[], None]:
    """What loading ``mask`` into the live mask of ``name`` does, checked
    first: a ValueError says why it cannot."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"the mask under {key} is a {type(mask).__name__}, not a tensor")
    if mask.shape != live.shape:
        raise ValueError(
            f"size mismatch for {key}: copying a mask with shape {tuple(mask.shape)} from checkpoint, "
            f"the mask in current model has shape {tuple(live.shape)}"
        )
    mask = _as_converted(mask.detach(), original, live, from_prune)
    sparsity = module.__dict__.get(name + SPARSITY_SUFFIX)
    if mask.dtype == live.dtype and not assign:
        # In place, so that the mask keeps its identity (masks(), inplace=True).
        if sparsity is not None:
            return lambda: sparsity.update_mask(mask)
        return lambda: live.copy_(mask)
    if not assign:
        mask = mask.to(live.device)
    holder = getattr(torch.classes.sparsity, sparsity._type().name()) if sparsity is not None else None
    try:
        # The plugin's checks (dtype, layout); target "export" reads the mask
        # through the operator, which checks the same.
        held = (holder or torch.classes.sparsity.FakeSparsity)(mask)
    except RuntimeError as error:
        raise ValueError(f"the mask under {key} is refused: {error}") from None
    if sparsity is not None:
        return lambda: setattr(module, name + SPARSITY_SUFFIX, held)
    return lambda: module.register_buffer(name + MASK_SUFFIX, mask, persistent=False)


def load_pruned_checkpoint(module: nn.Module, state_dict, prefix: str, local_metadata, strict: bool,
                           missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str]) -> None:
    """The load_state_dict pre-hook of a converted module (see the module's
    docstring). A module-level function, so that it pickles by name."""
    assign = local_metadata.get("assign_to_params_buffers", False)
    # A persistent buffer of the module named like prune's mask is its own.
    own = {prefix + key for key in module._buffers if key not in module._non_persistent_buffers_set}
    updates, errors = [], []
    for name, original, live in _held_masks(module):
        _rename_original(state_dict, prefix, name)
        for key, from_prune in ((prefix + name + PRUNE_MASK_SUFFIX, True),
                                (f"{prefix}parametrizations.{name}.0.mask", False)):
            if key in state_dict and key not in own:
                try:
                    updates.append(_mask_update(
                        module, name, key, state_dict.pop(key), original, live, from_prune, assign))
                except ValueError as error:
                    errors.append(str(error))
                break  # a second mask for the tensor stays, an unexpected key
    error_msgs.extend(errors)
    if not errors:
        for update in updates:
            update()
