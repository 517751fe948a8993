"""What ``convert`` takes from a pruned model: the pruned tensors of each
module, from either of PyTorch's pruning toolkits, checked before anything
changes (docs/end_to_end.md, "Pruning sources").

- torch.ao.pruning: a FakeSparsity parametrization per tensor (the mask
  multiplies the tensor), or a structured pruner's FakeStructuredSparsity (a
  row mask over dim 0) with its BiasHook, which adds ``_bias`` after the
  forward, its pruned rows zeroed when ``prune_bias``.
- torch.nn.utils.prune (every method, ``PruningContainer`` included): the
  tensor ``T_orig``, the buffer ``T_mask`` and a forward pre-hook that sets
  the plain attribute ``T = T_mask * T_orig`` before each forward. A mask of
  another floating dtype is converted to the tensor's, as prune computes.
  Converted, the mask applies whenever ``T`` is read, where prune's ``T``
  only changes when the module's own forward runs (``MultiheadAttention``
  reads ``out_proj.weight`` without calling ``out_proj``). Forward pre-hooks
  that are not prune's stay.
"""

import keyword
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
# torch.ao.pruning's parametrizations (the plugin's are torch.classes.sparsity.*)
from torch.ao.pruning._experimental.pruner.parametrization import BiasHook, FakeStructuredSparsity
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize, prune

from .naming import MASK_SUFFIX, ORIGINAL_SUFFIX, PRUNE_MASK_SUFFIX, PRUNE_ORIG_SUFFIX, SPARSITY_SUFFIX

__all__ = ["ConversionError", "parametrized_masks"]


class ConversionError(RuntimeError):
    """A module that ``convert`` cannot turn into a scriptable one."""


def add_bias(output: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor], prune_bias: bool,
             write_zeros: bool) -> torch.Tensor:
    """What torch.ao.pruning's BiasHook adds after a structured-pruned
    module's forward: ``_bias`` (detached: BiasHook reads ``.data``) along
    dim 1 of the output, its pruned rows zeroed when ``prune_bias``. BiasHook
    writes those zeros into ``_bias`` itself on every forward; so does
    ``write_zeros`` (target "torchscript"). Target "export" only selects
    (export and compile refuse a write into a parameter): ``convert`` and
    ``squash`` write the zeros of the masks they see."""
    bias = bias.detach()
    if prune_bias and mask is not None:
        if write_zeros:
            bias.masked_fill_(mask == 0, 0.0)
        else:
            bias = torch.where(mask != 0, bias, torch.zeros_like(bias))
    shape = [1] * output.dim()
    shape[1] = -1
    return output + bias.reshape(shape)


class PrunedTensor:
    """What the conversion moves for one pruned tensor ``name`` of a module,
    whichever toolkit pruned it. ``original`` is the tensor the mask applies
    to (``is_parameter``, ``persistent``: how it is registered) and ``mask``
    the mask as the plugin will hold it. ``source`` says what ``convert``
    takes away: ``PARAMETRIZATION`` (torch.ao.pruning's FakeSparsity
    parametrization; ``original`` is registered anew as ``<name>_original``) or
    ``PRUNE_HOOK`` (torch.nn.utils.prune: the forward pre-hook under key
    ``hook_id``, the plain attribute ``<name>`` it computes, the buffer
    ``<name>_mask``; ``<name>_orig`` is renamed ``<name>_original`` where it
    stands). ``row``: the mask is a row mask of shape ``[original.size(0)]``
    (torch.ao.pruning's FakeStructuredSparsity), held by
    FakeStructuredSparsity and read through ``fake_structured_sparsity``;
    ``bias_hook``: the key of the pruner's BiasHook in ``_forward_hooks``,
    replaced by the converted form."""

    def __init__(self, name, original, is_parameter, persistent, mask, source, hook_id=None, row=False,
                 bias_hook=None):
        self.name = name
        self.original = original
        self.is_parameter = is_parameter
        self.persistent = persistent
        self.mask = mask
        self.source = source
        self.hook_id = hook_id
        self.row = row
        self.bias_hook = bias_hook


PARAMETRIZATION = "parametrization"  # torch.ao.pruning's FakeSparsity parametrization
PRUNE_HOOK = "prune hook"  # torch.nn.utils.prune's forward pre-hook

# Module attributes that hold hooks; torch.nn.utils.prune puts its methods in
# _forward_pre_hooks only.
_HOOK_TABLES = (
    "_forward_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _where(fqn: str, module: nn.Module) -> str:
    base = parametrize.type_before_parametrizations(module)
    return f"module '{fqn}' ({base.__name__})" if fqn else f"the model itself ({base.__name__})"


def _prune_hooks(module: nn.Module) -> List[Tuple[int, "prune.BasePruningMethod"]]:
    """torch.nn.utils.prune's hooks on ``module``: (key, method)."""
    return [(key, hook) for key, hook in module._forward_pre_hooks.items() if isinstance(hook, prune.BasePruningMethod)]


def _bias_hooks(module: nn.Module) -> List[Tuple[int, BiasHook]]:
    """torch.ao.pruning's structured pruners' BiasHooks on ``module``: (key, hook)."""
    return [(key, hook) for key, hook in module._forward_hooks.items() if isinstance(hook, BiasHook)]


def _parametrized_tensors(where: str, module: nn.Module) -> List[PrunedTensor]:
    """The tensors of ``module`` that torch.ao.pruning's FakeSparsity and
    FakeStructuredSparsity parametrizations prune, with the structured
    pruners' BiasHook; anything else parametrized is refused."""
    bias_hooks = _bias_hooks(module)
    if not parametrize.is_parametrized(module):
        if bias_hooks:
            raise ConversionError(
                f"{where}: has a torch.ao.pruning BiasHook but no FakeStructuredSparsity parametrization of "
                "'weight' for it to follow"
            )
        return []
    found = []
    for name, parametrizations in module.parametrizations.items():
        kinds = [type(p).__name__ for p in parametrizations]
        kind = type(parametrizations[0]) if len(parametrizations) == 1 else None
        if not (kind is not None and issubclass(kind, (FakeSparsity, FakeStructuredSparsity))):
            raise ConversionError(
                f"{where}: tensor '{name}' has the parametrizations {kinds}; only a single "
                "torch.ao.pruning FakeSparsity or FakeStructuredSparsity per tensor can be converted"
            )
        row = issubclass(kind, FakeStructuredSparsity)
        if kind.forward is not (FakeStructuredSparsity if row else FakeSparsity).forward:
            raise ConversionError(
                f"{where}: tensor '{name}' has a {kind.__name__} parametrization that overrides forward, so what "
                "it computes need not be the mask's product; convert takes torch.ao.pruning's own"
            )
        if not hasattr(parametrizations, "original"):
            raise ConversionError(
                f"{where}: tensor '{name}' is stored as several tensors (original0, original1, ...); "
                "FakeSparsity keeps one"
            )
        for inner in parametrizations.modules():
            if _prune_hooks(inner):
                raise ConversionError(
                    f"{where}: tensor '{name}' has a FakeSparsity parametrization whose own tensors are pruned "
                    "by torch.nn.utils.prune too; convert can take one of the two"
                )
        is_parameter = "original" in parametrizations._parameters
        persistent = "original" not in parametrizations._non_persistent_buffers_set
        found.append(PrunedTensor(
            name, parametrizations.original, is_parameter, persistent, parametrizations[0].mask, PARAMETRIZATION,
            row=row,
        ))
    for key, hook in bias_hooks:
        weight = next((p for p in found if p.name == "weight" and p.row), None)
        if weight is None or hook.param is not module.parametrizations["weight"][0]:
            raise ConversionError(
                f"{where}: its torch.ao.pruning BiasHook does not follow the FakeStructuredSparsity "
                "parametrization of 'weight', so the pruned rows of its bias could not follow the mask"
            )
        if weight.bias_hook is not None:
            raise ConversionError(f"{where}: tensor 'weight' has two torch.ao.pruning BiasHooks")
        weight.bias_hook = key
    return found


def _prune_hook_tensors(where: str, module: nn.Module) -> List[PrunedTensor]:
    """The tensors of ``module`` that torch.nn.utils.prune prunes (any method,
    iterative pruning's PruningContainer included), in the order of their
    ``<name>_orig`` tensors; what would not convert to ``mask * original``
    exactly is refused."""
    for table in _HOOK_TABLES:
        for hook in getattr(module, table, {}).values():
            if isinstance(hook, prune.BasePruningMethod):
                name = getattr(hook, "_tensor_name", None)
                raise ConversionError(
                    f"{where}: " + (f"tensor '{name}': " if isinstance(name, str) else "")
                    + f"a torch.nn.utils.prune method ({type(hook).__name__}) is registered in {table}; "
                    "torch.nn.utils.prune registers its methods as forward pre-hooks only, so this one cannot be "
                    "converted"
                )
    hooks = _prune_hooks(module)
    if not hooks:
        return []
    parametrized = set(module.parametrizations) if parametrize.is_parametrized(module) else set()
    found = {}
    for key, hook in hooks:
        name = getattr(hook, "_tensor_name", None)
        method = type(hook).__name__
        if not isinstance(name, str):
            raise ConversionError(f"{where}: a torch.nn.utils.prune hook ({method}) names no tensor (_tensor_name)")
        if name in found:
            raise ConversionError(
                f"{where}: tensor '{name}' has two torch.nn.utils.prune hooks ({type(found[name][1]).__name__} and "
                f"{method}); torch.nn.utils.prune itself combines successive prunings into one PruningContainer"
            )
        overridden = [
            attribute for attribute in ("__call__", "apply_mask")
            if getattr(type(hook), attribute) is not getattr(prune.BasePruningMethod, attribute)
            or attribute in vars(hook)
        ]
        if overridden:
            raise ConversionError(
                f"{where}: tensor '{name}' is pruned by {method}, which overrides {' and '.join(overridden)}, so "
                "what it computes need not be mask * original; convert takes methods that only define the mask "
                "(compute_mask)"
            )
        if key in module._forward_pre_hooks_with_kwargs:
            raise ConversionError(
                f"{where}: tensor '{name}': its torch.nn.utils.prune hook ({method}) is registered with_kwargs, "
                "which prune's hooks do not take"
            )
        orig_name, mask_name = name + PRUNE_ORIG_SUFFIX, name + PRUNE_MASK_SUFFIX
        for attribute in (name, orig_name, mask_name):
            if attribute in parametrized:
                raise ConversionError(
                    f"{where}: tensor '{name}' is pruned by torch.nn.utils.prune and '{attribute}' has a "
                    "parametrization too; convert can take one of the two"
                )
        if name in module._parameters or name in module._buffers or name in module._modules:
            raise ConversionError(
                f"{where}: tensor '{name}' is pruned by torch.nn.utils.prune, but '{name}' is also a registered "
                "parameter, buffer or submodule, where prune keeps a plain attribute"
            )
        if module._parameters.get(orig_name) is not None:
            original, is_parameter, persistent = module._parameters[orig_name], True, True
        elif module._buffers.get(orig_name) is not None:
            original, is_parameter = module._buffers[orig_name], False
            persistent = orig_name not in module._non_persistent_buffers_set
        else:
            raise ConversionError(
                f"{where}: tensor '{name}' is pruned by torch.nn.utils.prune ({method}), but the module has no "
                f"parameter or buffer '{orig_name}' for it"
            )
        mask = module._buffers.get(mask_name)
        if not isinstance(mask, torch.Tensor):
            raise ConversionError(
                f"{where}: tensor '{name}' is pruned by torch.nn.utils.prune ({method}), but the module has no "
                f"buffer '{mask_name}' for its mask"
            )
        if mask.dtype not in (torch.bool, original.dtype) and original.is_floating_point():
            # prune computes mask.to(dtype=orig.dtype) * orig (a float64 mask
            # of a float32 tensor gives float32, where mask * orig gives float64).
            mask = mask.to(dtype=original.dtype)
        found[name] = (PrunedTensor(name, original, is_parameter, persistent, mask, PRUNE_HOOK, key), hook)
    order = list(module._parameters) + list(module._buffers)
    return sorted((p for p, _ in found.values()), key=lambda p: order.index(p.name + PRUNE_ORIG_SUFFIX))


def holder(row: bool):
    """The plugin's class that holds a mask of this kind."""
    return torch.classes.sparsity.FakeStructuredSparsity if row else torch.classes.sparsity.FakeSparsity


def plan_module(fqn: str, module: nn.Module, target: str = "torchscript") -> List[PrunedTensor]:
    """Checks that every pruned tensor of ``module`` (a FakeSparsity or
    FakeStructuredSparsity parametrization of torch.ao.pruning, or a
    torch.nn.utils.prune hook) can
    be converted and collects what moves; raises ConversionError naming the
    module and the tensor otherwise. Empty for a module with nothing pruned."""
    where = _where(fqn, module)
    if isinstance(module, nn.RNNBase) and (parametrize.is_parametrized(module) or _prune_hooks(module)):
        raise ConversionError(
            f"{where}: recurrent layers read their weights through the list _flat_weights, which "
            "TorchScript keeps as a plain attribute, so masks could not apply"
        )
    plan = _parametrized_tensors(where, module) + _prune_hook_tensors(where, module)
    for pruned in plan:
        name, original, mask = pruned.name, pruned.original, pruned.mask
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ConversionError(
                f"{where}: tensor '{name}' is not a Python identifier, so TorchScript code cannot read it"
            )
        for attribute in (name + ORIGINAL_SUFFIX, name + (SPARSITY_SUFFIX if target == "torchscript" else MASK_SUFFIX)):
            if pruned.source == PRUNE_HOOK and attribute == name + PRUNE_MASK_SUFFIX:
                continue  # prune's own mask buffer, which becomes the export target's
            if hasattr(module, attribute):
                raise ConversionError(
                    f"{where}: cannot hold tensor '{name}' as '{attribute}', the module already has "
                    "an attribute of that name"
                )
        if not original.is_floating_point():
            raise ConversionError(
                f"{where}: tensor '{name}' has dtype {original.dtype}; the plugin's FakeSparsity "
                "takes floating tensors only"
            )
        if pruned.row and (original.dim() == 0 or tuple(mask.shape) != tuple(original.shape[:1])):
            raise ConversionError(
                f"{where}: the row mask of tensor '{name}' has shape {tuple(mask.shape)} but the tensor "
                f"has {tuple(original.shape)}; FakeStructuredSparsity needs one entry per slice along dim 0"
            )
        if not pruned.row and mask.shape != original.shape:
            raise ConversionError(
                f"{where}: the mask of tensor '{name}' has shape {tuple(mask.shape)} but the tensor "
                f"has {tuple(original.shape)}; the plugin's FakeSparsity needs equal shapes"
            )
        if mask.device != original.device:
            raise ConversionError(
                f"{where}: the mask of tensor '{name}' is on {mask.device} but the tensor on {original.device}"
            )
        try:
            holder(pruned.row)(mask)  # the plugin's own checks (dtype, layout)
        except RuntimeError as error:
            raise ConversionError(f"{where}: the mask of tensor '{name}' is refused: {error}") from None
    return plan


def parametrized_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The masks of torch.ao.pruning's FakeSparsity parametrizations of a
    model, by the fqn of the tensor they prune."""
    return {
        f"{fqn}.{name}" if fqn else name: parametrizations[0].mask
        for fqn, module in model.named_modules() if parametrize.is_parametrized(module)
        for name, parametrizations in module.parametrizations.items()
    }


def source_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The masks of a model before conversion, from either toolkit, by the
    fqn of the tensor they prune."""
    result = parametrized_masks(model)
    for fqn, module in model.named_modules():
        for _, hook in _prune_hooks(module):
            name = getattr(hook, "_tensor_name", None)
            if isinstance(name, str) and isinstance(module._buffers.get(name + PRUNE_MASK_SUFFIX), torch.Tensor):
                result[f"{fqn}.{name}" if fqn else name] = module._buffers[name + PRUNE_MASK_SUFFIX]
    return result


def prune_computed_tensors(model: nn.Module) -> List[torch.Tensor]:
    """The plain attributes ``T`` that torch.nn.utils.prune's hooks compute."""
    return [
        module.__dict__[hook._tensor_name]
        for module in model.modules()
        for _, hook in _prune_hooks(module)
        if isinstance(module.__dict__.get(getattr(hook, "_tensor_name", None)), torch.Tensor)
    ]
