"""Converts a model pruned with torch.ao.pruning or torch.nn.utils.prune into
one whose masks stay live in the plugin: ``convert(model)`` for
torch.jit.script (the masks in ``torch.classes.sparsity.FakeSparsity``
objects: ``torchscript.py``), ``convert(model, target="export")`` for
torch.export, AOTInductor and torch.compile (mask buffers read through
``torch.ops.sparsity.fake_sparsity``: ``export.py``). What is taken and
refused: ``sources.py``; finding, measuring and squashing the masks
afterwards: ``masks.py``; the command line (``python -m
torch_sparsity.convert --help``): ``cli.py``. The whole layout:
docs/end_to_end.md.

Names: a pruned tensor ``T`` is read as before; the tensor the mask applies
to becomes ``T_original`` (``converted_name`` maps the parametrized model's
``<module>.parametrizations.T.original`` to ``<module>.T_original``), every
other parameter and buffer keeps its name, and masks are in no state dict.
``load_state_dict`` also takes the pruned model's state dict, masks included
(``checkpoints.py``).
A converted model pickles whole (``torch.save``, ``pickle``,
``copy.deepcopy``), its masks live in the copy too.
"""

import copy
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import export, load_library, torchscript
from .checkpoints import load_pruned_checkpoint
from .masks import compact_mask, fake_sparsities, mask_bytes, masks, squash, storage_bytes
from .naming import MASK_SUFFIX, ORIGINAL_SUFFIX, PRUNE_MASK_SUFFIX, PRUNE_ORIG_SUFFIX, SPARSITY_SUFFIX
from .sources import (
    PRUNE_HOOK,
    ConversionError,
    PrunedTensor,
    holder,
    parametrized_masks,
    plan_module,
    prune_computed_tensors,
)

__all__ = [
    "ConversionError",
    "MASK_SUFFIX",
    "ORIGINAL_SUFFIX",
    "PRUNE_MASK_SUFFIX",
    "PRUNE_ORIG_SUFFIX",
    "SPARSITY_SUFFIX",
    "TARGETS",
    "compact_mask",
    "convert",
    "converted_name",
    "fake_sparsities",
    "mask_bytes",
    "masks",
    "parametrized_masks",
    "squash",
    "storage_bytes",
]

TARGETS = ("torchscript", "export")


def _rename_in_place(table: dict, old: str, new: str) -> None:
    """Renames a key of a module's ``_parameters`` or ``_buffers`` where it
    stands, so that ``parameters()`` and ``buffers()`` keep their order."""
    items = [(new if key == old else key, value) for key, value in table.items()]
    table.clear()
    table.update(items)


def _take_prune_hook_away(module: nn.Module, pruned: PrunedTensor, keep_mask_buffer: bool) -> None:
    """Removes what torch.nn.utils.prune added for one tensor: the hook, the
    plain attribute it computes, the mask buffer (unless ``keep_mask_buffer``:
    the export target's buffer has the same name), and renames ``<name>_orig``
    ``<name>_original``."""
    name = pruned.name
    del module._forward_pre_hooks[pruned.hook_id]
    getattr(module, "_forward_pre_hooks_always_called", {}).pop(pruned.hook_id, None)
    module.__dict__.pop(name, None)  # what the hook computed before the last forward
    orig, original = name + PRUNE_ORIG_SUFFIX, name + ORIGINAL_SUFFIX
    if pruned.is_parameter:
        _rename_in_place(module._parameters, orig, original)
    else:
        _rename_in_place(module._buffers, orig, original)
        if orig in module._non_persistent_buffers_set:
            module._non_persistent_buffers_set.remove(orig)
            module._non_persistent_buffers_set.add(original)
    if not keep_mask_buffer:
        del module._buffers[name + PRUNE_MASK_SUFFIX]
        module._non_persistent_buffers_set.discard(name + PRUNE_MASK_SUFFIX)


def _apply_plan(module: nn.Module, plan: List[PrunedTensor], compact_masks: bool, target: str) -> None:
    base = parametrize.type_before_parametrizations(module)
    names = tuple((p.name, p.row) for p in plan)
    parametrized = parametrize.is_parametrized(module)
    # The parametrization's class (and its property) goes first, so that
    # nothing below goes through parametrize's __getattr__/__setattr__ logic.
    make_class = torchscript.sparse_class if target == "torchscript" else export.export_class
    # Whether the converted bias hook goes on (only where there is a _bias to add).
    bias_hook = getattr(module, "_bias", None) is not None and any(p.bias_hook is not None for p in plan)
    module.__class__ = make_class(base, names, bias_hook)
    if parametrized:
        del module._modules["parametrizations"]
    for pruned in plan:
        if pruned.source == PRUNE_HOOK:
            _take_prune_hook_away(module, pruned, keep_mask_buffer=target == "export")
        elif pruned.is_parameter:
            module.register_parameter(pruned.name + ORIGINAL_SUFFIX, pruned.original)
        else:
            module.register_buffer(pruned.name + ORIGINAL_SUFFIX, pruned.original, persistent=pruned.persistent)
        mask = compact_mask(pruned.mask, pruned.original) if compact_masks else pruned.mask
        if target == "torchscript":
            setattr(module, pruned.name + SPARSITY_SUFFIX, holder(pruned.row)(mask))
        else:
            # Not persistent: masks stay out of state dicts, as with the
            # parametrization (and an exported program keeps them as constants).
            # prune's own T_mask buffer is replaced where it stands.
            module.register_buffer(pruned.name + MASK_SUFFIX, mask, persistent=False)
        if pruned.bias_hook is not None:
            _replace_bias_hook(module, pruned, target)
    # load_state_dict takes the pruned model's checkpoints too (checkpoints.py).
    module.register_load_state_dict_pre_hook(load_pruned_checkpoint)


def _replace_bias_hook(module: nn.Module, pruned: PrunedTensor, target: str) -> None:
    """The pruner's BiasHook goes; where there is a ``_bias`` to add, the
    converted hook takes its place, and the rows the mask prunes now are
    zeroed in ``_bias`` as BiasHook's first forward would (with
    ``prune_bias``)."""
    for table in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(module, table, {}).pop(pruned.bias_hook, None)
    if getattr(module, "_bias", None) is None:
        return  # BiasHook adds nothing then
    if module.prune_bias:
        with torch.no_grad():
            module._bias[~(pruned.mask != 0)] = 0
    hook = torchscript.row_mask_bias_hook if target == "torchscript" else export.row_mask_bias_hook
    module.register_forward_hook(hook)


_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks")


def _scripts(module: nn.Module, hooks: Dict[str, dict]) -> bool:
    """Whether TorchScript compiles a shallow copy of ``module`` that has
    only ``hooks`` (by hook table)."""
    trial = copy.copy(module)
    for table in _HOOK_TABLES:
        setattr(trial, table, OrderedDict(hooks.get(table, {})))
    try:
        torch.jit.script(trial)
    except Exception:  # TorchScript raises several exception types
        return False
    return True


def _unscriptable_hooks(module: nn.Module) -> List[str]:
    """The forward hooks and pre-hooks TorchScript cannot compile, where the
    module compiles without them (TorchScript compiles hooks with the module)."""
    if not _scripts(module, {}):
        return []
    return [
        getattr(hook, "__qualname__", repr(hook))
        for table in _HOOK_TABLES
        for key, hook in getattr(module, table).items()
        if not _scripts(module, {table: {key: hook}})
    ]


def _check_scriptable(converted: Dict[type, Tuple[str, nn.Module]]) -> None:
    for fqn, module in converted.values():
        try:
            torch.jit.script(module)
        except Exception as error:  # TorchScript raises several exception types
            where = f"module '{fqn}'" if fqn else "the model itself"
            hooks = _unscriptable_hooks(module)
            cause = (
                f"its hooks {hooks} (remove them before scripting, or convert with target='export')"
                if hooks
                else "it (does its forward read a pruned tensor other than as self.<name>?)"
            )
            raise ConversionError(
                f"{where} ({type(module).__name__}) was converted, but TorchScript cannot compile {cause}: {error}"
            ) from None


def convert(
    model: nn.Module,
    inplace: bool = False,
    check_scriptable: bool = True,
    compact_masks: Optional[bool] = None,
    target: str = "torchscript",
) -> nn.Module:
    """Returns ``model`` with every FakeSparsity parametrization of
    torch.ao.pruning and every torch.nn.utils.prune pruning replaced by the
    plugin's FakeSparsity (the layout: docs/end_to_end.md), ready for
    ``torch.jit.script``; with ``target="export"``, by mask buffers read
    through the ``fake_sparsity`` operator, ready for torch.export,
    AOTInductor and torch.compile.

    Taken: a single torch.ao.pruning ``FakeSparsity`` or
    ``FakeStructuredSparsity`` parametrization per tensor (the structured
    pruners' ``BiasHook`` with it); torch.nn.utils.prune's forward pre-hooks of any method whose
    result is ``mask * orig`` (prune's own methods, ``PruningContainer``, and
    subclasses of ``BasePruningMethod`` that only define ``compute_mask``), on
    parameters and buffers of any module at any depth, several per module.
    Forward pre-hooks that are not prune's stay on their modules.
    Refused (ConversionError naming the module and the tensor): any other
    parametrization, or more than one on a tensor; a prune method that
    overrides ``apply_mask`` or ``__call__``; two prune hooks on one tensor
    (prune itself combines them into a PruningContainer); a prune method
    registered anywhere but as a plain forward pre-hook; a tensor both
    parametrized and pruned by prune (either way round); a prune hook whose
    ``T_orig`` or ``T_mask`` is missing; a mask whose shape or device is not
    its tensor's, or whose dtype the plugin refuses; a non-floating tensor; a
    tensor name that is not an identifier or whose new names are taken;
    recurrent layers; and, for target "torchscript", a converted module that
    TorchScript cannot compile (found once converted: see
    ``check_scriptable``).

    With ``inplace=False`` (the default) the model is deep-copied first, so the
    masks are copies and ``model`` stays as it was; with ``inplace=True`` the
    model itself is changed: its Parameters stay the same objects and the
    FakeSparsity objects hold the sparsifier's (or prune's ``T_mask``) very
    mask tensors.
    ``compact_masks`` stores each mask as bool where ``compact_mask`` finds
    that gives the same results (a float32 mask of 0s and 1s, what
    torch.ao.pruning's sparsifiers make, takes four times the memory); masks
    with other values keep their dtype. It defaults to True with
    ``inplace=False`` and to False with ``inplace=True``, where a compacted
    mask would no longer be the tensor the sparsifier updates. A FakeSparsity
    holding a bool mask converts what ``update_mask`` gives it to bool
    (nonzero is True), as ``copy_`` does.
    ``check_scriptable`` compiles one converted module of each class with
    TorchScript, so that a module TorchScript cannot compile is named here
    (target "torchscript" only).
    Anything that cannot be converted raises ConversionError, before the model
    is changed (with ``inplace=True`` too); no mask is ever dropped: after
    conversion no prune hook is left and ``masks`` lists every pruned tensor.
    """
    load_library()
    if target not in TARGETS:
        raise ValueError(f"convert: target must be one of {TARGETS}, got {target!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, but got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConversionError("the model is already a ScriptModule; convert the eager model before scripting it")
    # Every refusal comes before anything is copied or changed.
    for fqn, module in model.named_modules():
        plan_module(fqn, module, target)
    if not inplace:
        # The tensors torch.nn.utils.prune's hooks compute (plain attributes,
        # not graph leaves) refuse deepcopy; the copies go without them.
        memo = {id(tensor): None for tensor in prune_computed_tensors(model)}
        try:
            model = copy.deepcopy(model, memo)
        except Exception as error:
            raise ConversionError(
                f"copy.deepcopy(model) failed ({error}); convert(model, inplace=True) converts the model itself"
            ) from error
    plans = [(fqn, module, plan_module(fqn, module, target)) for fqn, module in model.named_modules()]
    plans = [(fqn, module, plan) for fqn, module, plan in plans if plan]
    if compact_masks is None:
        compact_masks = not inplace
    converted = {}
    for fqn, module, plan in plans:
        _apply_plan(module, plan, compact_masks, target)
        converted.setdefault(type(module), (fqn, module))
    if check_scriptable and target == "torchscript":
        _check_scriptable(converted)
    return model


def converted_name(name: str) -> str:
    """The name in the converted model of a parameter or buffer of the
    parametrized model: ``a.parametrizations.weight.original`` becomes
    ``a.weight_original``; other names stay."""
    pieces = name.split(".")
    if len(pieces) >= 3 and pieces[-3] == "parametrizations" and pieces[-1] == "original":
        return ".".join(pieces[:-3] + [pieces[-2] + ORIGINAL_SUFFIX])
    return name


if __name__ == "__main__":
    from torch_sparsity.cli import main  # cli imports this module, so not before

    sys.exit(main())
