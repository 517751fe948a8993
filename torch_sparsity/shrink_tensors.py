"""The forms a pruned tensor takes in a model that ``shrink`` reads and
rebuilds: a plain parameter or buffer; torch.ao.pruning's FakeSparsity or
FakeStructuredSparsity parametrization (``parametrizations.T.original`` and
the mask), with the structured pruners' BiasHook (the bias moved to
``_bias``); torch.nn.utils.prune's ``T_orig``/``T_mask`` and forward
pre-hook; ``convert(target="export")``'s ``T_original``/``T_mask``.

``plain_copy`` makes the copy the analysis exports: every pruned tensor
replaced by its effective (masked) value as a plain tensor. ``slice_tensor``
keeps some indices of a tensor along a dim in whichever form it has, its mask
sliced with it; ``add_to_bias`` folds a constant into a bias."""

import copy
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from . import export
from .masks import fake_sparsities
from .naming import MASK_SUFFIX, ORIGINAL_SUFFIX, PRUNE_MASK_SUFFIX, PRUNE_ORIG_SUFFIX
from .sources import PARAMETRIZATION, ConversionError, _bias_hooks, plan_module, prune_computed_tensors

__all__ = [
    "ShrinkError", "add_to_bias", "can_slice", "copy_model", "masked_tensors", "plain_copy", "refresh_prune",
    "slice_tensor", "tensor_shape",
]


class ShrinkError(ValueError):
    """What ``shrink`` refuses (the model is left unchanged): no example
    inputs, a model that does not run on them or that torch.export cannot
    capture, a pruning form it cannot rebuild."""


def _is_export_converted(module: nn.Module) -> bool:
    return type(module).__module__ == export.__name__


def _export_names(module: nn.Module) -> List[str]:
    """The tensors a module converted with target "export" reads through a mask."""
    return [name for name, value in vars(type(module)).items() if isinstance(value, property)]


def _bias_hook_keys(module: nn.Module) -> List[int]:
    from_pruner = [key for key, _ in _bias_hooks(module)]
    converted = [key for key, hook in module._forward_hooks.items() if hook is export.row_mask_bias_hook]
    return from_pruner + converted


def plans(model: nn.Module) -> Dict[str, list]:
    """Per module fqn, what torch.ao.pruning and torch.nn.utils.prune prune
    (``sources.plan_module``); ShrinkError for what cannot be taken."""
    if fake_sparsities(model):
        raise ShrinkError(
            "the model was converted with target 'torchscript', whose masks live in TorchScript objects; "
            "shrink the pruned model before converting it, or convert with target='export'"
        )
    result = {}
    for fqn, module in model.named_modules():
        try:
            plan = plan_module(fqn, module, "export")
        except ConversionError as error:
            raise ShrinkError(str(error)) from None
        if plan:
            result[fqn] = plan
    return result


def masked_tensors(model: nn.Module) -> set:
    """The fqns of the tensors that a mask multiplies, in any form."""
    result = set()
    for fqn, plan in plans(model).items():
        result.update(f"{fqn}.{p.name}" if fqn else p.name for p in plan)
    for fqn, module in model.named_modules():
        if _is_export_converted(module):
            result.update(f"{fqn}.{name}" if fqn else name for name in _export_names(module)
                          if getattr(module, name + MASK_SUFFIX, None) is not None)
    return result


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy; the tensors torch.nn.utils.prune's hooks compute (not
    graph leaves, which deepcopy refuses) are recomputed by the next forward."""
    memo = {id(tensor): None for tensor in prune_computed_tensors(model)}
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:
        raise ShrinkError(f"copy.deepcopy(model) failed ({error}); shrink(model, inplace=True) shrinks the model "
                          "itself") from error


def _effective_bias(module: nn.Module, row_mask) -> torch.Tensor:
    """What a BiasHook adds: ``_bias``, its pruned rows zeroed with ``prune_bias``."""
    bias = module._bias.detach().clone()
    if getattr(module, "prune_bias", False) and row_mask is not None:
        bias[~(row_mask != 0)] = 0
    return bias


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every pruned tensor is a plain parameter
    (or buffer) holding its masked value, and BiasHooks are biases: the same
    outputs, and a graph whose weights are the module's own."""
    all_plans = plans(model)
    plain = copy_model(model)
    modules = dict(plain.named_modules())
    with torch.no_grad():
        for fqn, plan in all_plans.items():
            module = modules[fqn]
            row_mask = None
            if parametrize.is_parametrized(module):
                row_mask = _plain_parametrized(module)
            for pruned in plan:
                if pruned.source != PARAMETRIZATION:
                    module.__dict__.pop(pruned.name, None)
                    original = getattr(module, pruned.name + PRUNE_ORIG_SUFFIX)
                    mask = getattr(module, pruned.name + PRUNE_MASK_SUFFIX)
                    setattr(module, pruned.name, mask.to(original.dtype) * original)
                    prune.remove(module, pruned.name)
            _plain_bias(module, row_mask)
        for module in modules.values():
            if _is_export_converted(module):
                row_mask = getattr(module, "weight" + MASK_SUFFIX, None)
                values = {name: getattr(module, name).detach().clone() for name in _export_names(module)}
                module.__class__ = type(module).__bases__[0]
                for name, value in values.items():
                    is_parameter = name + ORIGINAL_SUFFIX in module._parameters
                    (module._parameters if is_parameter else module._buffers).pop(name + ORIGINAL_SUFFIX)
                    module._buffers.pop(name + MASK_SUFFIX, None)
                    if is_parameter:
                        module.register_parameter(name, nn.Parameter(value))
                    else:
                        module.register_buffer(name, value)
                _plain_bias(module, row_mask)
    return plain


def _plain_parametrized(module: nn.Module):
    """Each parametrized tensor becomes a plain one holding its value; returns
    the weight's row mask, if any. (parametrize.remove_parametrizations would
    change the parametrized class, which the model's copies share.)"""
    plists = module.parametrizations
    row_mask = plists["weight"][0].mask.clone() if "weight" in plists and plists["weight"][0].mask.dim() == 1 else None
    values = {name: (getattr(module, name).detach().clone(), "original" in plist._parameters)
              for name, plist in plists.items()}
    module.__class__ = parametrize.type_before_parametrizations(module)
    del module._modules["parametrizations"]
    for name, (value, is_parameter) in values.items():
        if is_parameter:
            module.register_parameter(name, nn.Parameter(value))
        else:
            module.register_buffer(name, value)
    return row_mask


def _plain_bias(module: nn.Module, row_mask) -> None:
    """A structured pruner's BiasHook (or its converted form) becomes the bias."""
    keys = _bias_hook_keys(module)
    for key in keys:
        module._forward_hooks.pop(key)
    if keys and getattr(module, "_bias", None) is not None:
        bias = _effective_bias(module, row_mask)
        del module._bias
        module.bias = nn.Parameter(bias)


def _locate(module: nn.Module, name: str) -> Tuple[object, str, list]:
    """Where tensor ``name`` of ``module`` is held: (holder, key in its
    _parameters or _buffers, [(mask holder, key)] for its masks)."""
    if _is_export_converted(module) and name in _export_names(module):
        masks = [(module, name + MASK_SUFFIX)] if getattr(module, name + MASK_SUFFIX, None) is not None else []
        return module, name + ORIGINAL_SUFFIX, masks
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        return plist, "original", [(plist[0], "mask")]
    if name + PRUNE_ORIG_SUFFIX in module._parameters or name + PRUNE_ORIG_SUFFIX in module._buffers:
        if isinstance(module._buffers.get(name + PRUNE_MASK_SUFFIX), torch.Tensor):
            return module, name + PRUNE_ORIG_SUFFIX, [(module, name + PRUNE_MASK_SUFFIX)]
    if name == "bias" and module._parameters.get("bias") is None and getattr(module, "_bias", None) is not None:
        return module, "_bias", []
    if module._parameters.get(name) is not None or module._buffers.get(name) is not None:
        return module, name, []
    raise KeyError(name)


def _get(holder, key):
    return holder._parameters[key] if key in holder._parameters else holder._buffers[key]


def _put(holder, key, value: torch.Tensor) -> None:
    old = _get(holder, key)
    if key in holder._parameters:
        holder._parameters[key] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        holder._buffers[key] = value


def tensor_shape(module: nn.Module, name: str) -> torch.Size:
    holder, key, _ = _locate(module, name)
    return _get(holder, key).shape


def can_slice(module: nn.Module, name: str) -> bool:
    try:
        _locate(module, name)
    except KeyError:
        return False
    return True


def slice_tensor(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    """Keeps ``index`` of tensor ``name`` along ``dim``, and of its masks
    where they run along that dim (a row mask only has dim 0)."""
    holder, key, masks = _locate(module, name)
    tensor = _get(holder, key)
    with torch.no_grad():
        _put(holder, key, tensor.detach().index_select(dim, index.to(tensor.device)).clone())
        for mask_holder, mask_key in masks:
            mask = mask_holder._buffers[mask_key]
            if mask.dim() == tensor.dim() or dim == 0:
                mask_holder._buffers[mask_key] = mask.index_select(dim, index.to(mask.device)).clone()


def refresh_prune(model: nn.Module) -> None:
    """torch.nn.utils.prune's tensors ``T``, which its hooks set before each
    forward, computed for the current shapes, as pruning leaves them (a copy
    has none until its first forward), without autograd: so they deep-copy."""
    with torch.no_grad():
        for module in model.modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    name = hook._tensor_name
                    original = getattr(module, name + PRUNE_ORIG_SUFFIX)
                    module.__dict__[name] = getattr(module, name + PRUNE_MASK_SUFFIX).to(original.dtype) * original


def add_to_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """Adds ``delta`` to the module's bias (made when it has none)."""
    try:
        holder, key, masks = _locate(module, "bias")
    except KeyError:
        weight = _get(*_locate(module, "weight")[:2])
        module.bias = nn.Parameter(torch.zeros(delta.shape, dtype=weight.dtype, device=weight.device))
        holder, key, masks = module, "bias", []
    assert not masks, "a masked bias takes no fold"
    with torch.no_grad():
        bias = _get(holder, key)
        bias.add_(delta.to(bias.dtype).to(bias.device))
