"""Converts a model pruned with torch.ao.pruning or torch.nn.utils.prune into
one that torch.jit.script accepts, with its masks still live in the plugin's
FakeSparsity.

torch.ao.pruning keeps each pruned tensor behind a FakeSparsity
parametrization (torch.nn.utils.parametrize): reading ``module.weight``
computes ``mask * module.parametrizations.weight.original`` in Python, which
TorchScript cannot run. ``convert`` gives every such module the same reading
in a form TorchScript compiles. For a module ``m`` of class ``C`` with a pruned
tensor ``weight``:

- ``m.weight_original`` is the tensor the sparsifier keeps in
  ``m.parametrizations.weight.original`` (the same Parameter, or buffer);
- ``m.weight_sparsity`` is a ``torch.classes.sparsity.FakeSparsity`` holding the
  mask: by default as a bool tensor (``compact_masks``: a quarter of a float32
  mask's memory, the same results bit for bit); with ``inplace=True`` the
  sparsifier's very tensor;
- ``m``'s class becomes a subclass of ``C``, also named ``C``, with a property
  ``weight`` that returns ``m.weight_sparsity.forward(m.weight_original)``, or
  ``m.weight_original`` once the mask is squashed (``weight_sparsity`` is
  ``None``). TorchScript compiles properties, so ``C.forward`` runs unchanged
  and gradients reach ``weight_original`` as they reach the original through
  the parametrization (``grad * mask``).

Any module type works this way, at any depth, as long as its forward reads the
tensor as ``self.<name>``, which the parametrization needs too. The module
utilities see the result: ``module_contains_param(m, "FakeSparsity")`` is true,
and ``type_before_parametrizations(m)`` is ``C``'s name.

Names: the parametrized model's ``<module>.parametrizations.<name>.original``
becomes ``<module>.<name>_original`` (``converted_name`` maps one to the other);
every other parameter and buffer keeps its name. The order of
``parameters()`` is the same when the pruned modules have no children (all the
layers of torchvision's models except ``MultiheadAttention``): the
parametrization's tensors come after the module's own, and so do the
``_original`` tensors. Masks are not in any state dict.

``convert(model, target="export")`` is the form for torch.export,
AOTInductor and torch.compile: ``m.weight_original`` as above, the mask as a
non-persistent buffer ``m.weight_mask`` (bool where that is exact; never in a
state dict), and a plain Python property ``weight`` that returns
``torch.ops.sparsity.fake_sparsity(m.weight_original, m.weight_mask)``. The
operator has a Meta kernel and autograd in C++, so export and compile trace
through it; the mask buffer is a constant of an exported program and of an
AOTInductor package (``torch_sparsity.aoti``). ``torch_sparsity.masks``
finds the live masks of either target, scripted or exported too.

Models pruned with ``torch.nn.utils.prune`` (every method,
``global_unstructured``, ``custom_from_mask``, iterative pruning, whose
``PruningContainer`` keeps the combined mask in ``T_mask``) convert to the
same layout: prune keeps ``m.weight_orig``, a buffer ``m.weight_mask`` and a
forward pre-hook that sets the plain attribute ``m.weight = weight_mask *
weight_orig`` before each forward; ``convert`` renames ``weight_orig``
``weight_original`` where it stands (the same Parameter), turns the mask into
``weight_sparsity`` (or, for target "export", the same-named buffer
``weight_mask``, now non-persistent: out of the state dict), and removes the
hook and the plain attribute. The result equals prune's model bit for bit,
forward and gradients (prune computes ``mask.to(orig.dtype) * orig``: a mask
of another dtype is converted so). One difference: the converted module
reads its mask every time the tensor is read, where prune's attribute is only
recomputed when the module's own forward runs (``MultiheadAttention`` reads
``out_proj.weight`` without calling ``out_proj``, so with prune that weight
stays what it was when pruned; converted, it follows ``out_proj.weight_original``).
A module may mix both toolkits on different tensors; forward pre-hooks that
are not prune's stay where they are (they see the tensor as it is read).

Command line: ``python -m torch_sparsity.convert --help``.
"""

import argparse
import copy
import importlib
import inspect
import keyword
import linecache
import pickle
import re
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from . import load_library

__all__ = [
    "ConversionError",
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

ORIGINAL_SUFFIX = "_original"
SPARSITY_SUFFIX = "_sparsity"  # target "torchscript": the FakeSparsity object
MASK_SUFFIX = "_mask"  # target "export": the mask buffer
TARGETS = ("torchscript", "export")


class ConversionError(RuntimeError):
    """A module that ``convert`` cannot turn into a scriptable one."""


def _torch_ao_fake_sparsity():
    from torch.ao.pruning.sparsifier.utils import FakeSparsity

    return FakeSparsity


def _torch_ao_fake_structured_sparsity():
    from torch.ao.pruning._experimental.pruner.parametrization import FakeStructuredSparsity

    return FakeStructuredSparsity


# ------------------------------------------------------------ generated code

_getters: Dict[str, object] = {}
_getter_sources: Dict[str, Tuple[str, str]] = {}


def _register_source(filename: str, source: str) -> None:
    # TorchScript compiles a property from its source, which it reads through
    # inspect (linecache). An mtime of None keeps linecache.checkcache from
    # dropping the entry.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def _masked_getter(name: str):
    """The getter of property ``name``: TorchScript's getattr needs a literal
    attribute name, so the getter's source is generated for each name."""
    if name not in _getters:
        source = (
            f"def {name}(self):\n"
            f"    sparsity = self.{name}{SPARSITY_SUFFIX}\n"
            f"    if sparsity is None:\n"
            f"        return self.{name}{ORIGINAL_SUFFIX}\n"
            f"    return sparsity.forward(self.{name}{ORIGINAL_SUFFIX})\n"
        )
        filename = f"<torch_sparsity.convert: getter of {name}>"
        namespace = {"__name__": __name__}
        exec(compile(source, filename, "exec"), namespace)
        _getters[name] = namespace[name]
        _getter_sources[name] = (filename, source)
    _register_source(*_getter_sources[name])
    return _getters[name]


def _base_annotations(cls) -> dict:
    # TorchScript types attributes with the class annotations of the nearest
    # class that has any; the subclass must repeat them next to its own.
    get_annotations = getattr(torch.jit._recursive, "get_annotations", inspect.get_annotations)
    return dict(get_annotations(cls))


_sparse_classes: Dict[Tuple[type, Tuple[Tuple[str, bool], ...]], type] = {}


def _sparse_class(base: type, names: Tuple[Tuple[str, bool], ...]) -> type:
    """The subclass of ``base`` whose tensors go through FakeSparsity, or
    FakeStructuredSparsity for those of ``names`` ((name, row mask) pairs)
    that have a row mask."""
    key = (base, names)
    if key not in _sparse_classes:
        annotations = _base_annotations(base)
        namespace = {"__module__": __name__, "__qualname__": base.__qualname__}
        for name, row in names:
            holder = torch.classes.sparsity.FakeStructuredSparsity if row else torch.classes.sparsity.FakeSparsity
            # Optional, so that squash can drop the mask (TorchScript checks
            # the type of every attribute assignment, from C++ too).
            annotations[name + SPARSITY_SUFFIX] = Optional[holder]
            namespace[name] = property(
                _masked_getter(name), doc=f"{name}{SPARSITY_SUFFIX}.forward({name}{ORIGINAL_SUFFIX})"
            )
        namespace["__annotations__"] = annotations
        _sparse_classes[key] = type(base.__name__, (base,), namespace)
    for name, _ in names:
        _masked_getter(name)  # registers the source again if linecache was cleared
    return _sparse_classes[key]


def _export_getter(name: str, row: bool):
    """The getter of property ``name`` for target "export": plain Python,
    which torch.export and torch.compile trace (the operator's Meta kernel
    gives shapes, its C++ autograd the backward)."""
    original, mask = name + ORIGINAL_SUFFIX, name + MASK_SUFFIX
    apply = torch.ops.sparsity.fake_structured_sparsity if row else torch.ops.sparsity.fake_sparsity

    def getter(self):
        held = getattr(self, mask)
        if held is None:  # squashed
            return getattr(self, original)
        return apply(getattr(self, original), held)

    getter.__name__ = name
    return getter


_export_classes: Dict[Tuple[type, Tuple[Tuple[str, bool], ...]], type] = {}


def _export_class(base: type, names: Tuple[Tuple[str, bool], ...]) -> type:
    """The subclass of ``base`` whose tensors ``names`` ((name, row mask)
    pairs) read their masks."""
    key = (base, names)
    if key not in _export_classes:
        namespace = {"__module__": __name__, "__qualname__": base.__qualname__}
        for name, row in names:
            op = "fake_structured_sparsity" if row else "fake_sparsity"
            namespace[name] = property(
                _export_getter(name, row), doc=f"{op}({name}{ORIGINAL_SUFFIX}, {name}{MASK_SUFFIX})"
            )
        _export_classes[key] = type(base.__name__, (base,), namespace)
    return _export_classes[key]


def _add_bias(output: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor], prune_bias: bool,
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


def _row_mask_bias_hook(module, input: Tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """BiasHook for target "torchscript" (TorchScript compiles the hook)."""
    sparsity = module.weight_sparsity
    mask: Optional[torch.Tensor] = None
    if sparsity is not None:
        mask = sparsity.mask
    return _add_bias(output, module._bias, mask, module.prune_bias, True)


def _row_mask_bias_hook_export(module, input, output):
    """BiasHook for target "export"."""
    return _add_bias(output, module._bias, module.weight_mask, module.prune_bias, False)


# ------------------------------------------------------------------ convert


class _PrunedTensor:
    """What the conversion moves for one pruned tensor ``name`` of a module,
    whichever toolkit pruned it. ``original`` is the tensor the mask applies
    to (``is_parameter``, ``persistent``: how it is registered) and ``mask``
    the mask as the plugin will hold it. ``source`` says what ``_apply_plan``
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
PRUNE_ORIG_SUFFIX = "_orig"  # torch.nn.utils.prune's names
PRUNE_MASK_SUFFIX = "_mask"

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


def _bias_hooks(module: nn.Module) -> List[Tuple[int, object]]:
    """torch.ao.pruning's structured pruners' BiasHooks on ``module``: (key, hook)."""
    from torch.ao.pruning._experimental.pruner.parametrization import BiasHook

    return [(key, hook) for key, hook in module._forward_hooks.items() if isinstance(hook, BiasHook)]


def _parametrized_tensors(where: str, module: nn.Module) -> List[_PrunedTensor]:
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
    fake_sparsity_class, structured_class = _torch_ao_fake_sparsity(), _torch_ao_fake_structured_sparsity()
    found = []
    for name, parametrizations in module.parametrizations.items():
        kinds = [type(p).__name__ for p in parametrizations]
        kind = type(parametrizations[0]) if len(parametrizations) == 1 else None
        if not (kind is not None and issubclass(kind, (fake_sparsity_class, structured_class))):
            raise ConversionError(
                f"{where}: tensor '{name}' has the parametrizations {kinds}; only a single "
                "torch.ao.pruning FakeSparsity or FakeStructuredSparsity per tensor can be converted"
            )
        row = issubclass(kind, structured_class)
        if kind.forward is not (structured_class if row else fake_sparsity_class).forward:
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
        found.append(_PrunedTensor(
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


def _prune_hook_tensors(where: str, module: nn.Module) -> List[_PrunedTensor]:
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
        found[name] = (_PrunedTensor(name, original, is_parameter, persistent, mask, PRUNE_HOOK, key), hook)
    order = list(module._parameters) + list(module._buffers)
    return sorted((p for p, _ in found.values()), key=lambda p: order.index(p.name + PRUNE_ORIG_SUFFIX))


def _holder(row: bool):
    """The plugin's class that holds a mask of this kind."""
    return torch.classes.sparsity.FakeStructuredSparsity if row else torch.classes.sparsity.FakeSparsity


def _plan_module(fqn: str, module: nn.Module, target: str = "torchscript") -> List[_PrunedTensor]:
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
            _holder(pruned.row)(mask)  # the plugin's own checks (dtype, layout)
        except RuntimeError as error:
            raise ConversionError(f"{where}: the mask of tensor '{name}' is refused: {error}") from None
    return plan


def compact_mask(mask: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool tensor when ``fake_sparsity(tensor, mask)`` gives the
    same result with it, bit for bit and in the same dtype; else ``mask``.

    That holds when every entry is 1 or +0 (a -0 would flip the sign of the
    zeros it makes, any other value scales) and when a bool mask leaves the
    result's dtype alone (a float32 mask of a float16 tensor gives float32).
    A mask whose values cannot be read (on the meta device) stays as it is,
    and so does one that requires grad (a bool mask would get none)."""
    if mask.dtype == torch.bool or mask.device.type == "meta" or mask.requires_grad:
        return mask
    if torch.promote_types(tensor.dtype, mask.dtype) != tensor.dtype:
        return mask
    with torch.no_grad():
        zero = mask == 0
        if mask.is_floating_point():
            zero &= ~torch.signbit(mask)
        if not bool((zero | (mask == 1)).all()):
            return mask
        return mask != 0


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once."""
    sizes = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        sizes[(storage.data_ptr(), tensor.device)] = storage.nbytes()
    return sum(sizes.values())


def mask_bytes(masks) -> int:
    """Bytes the given mask tensors take, each storage counted once (a dict of
    FakeSparsity objects, as ``fake_sparsities`` returns, or of tensors)."""
    return storage_bytes(getattr(mask, "mask", mask) for mask in masks.values())


def parametrized_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The masks of torch.ao.pruning's FakeSparsity parametrizations of a
    model, by the fqn of the tensor they prune."""
    return {
        f"{fqn}.{name}" if fqn else name: parametrizations[0].mask
        for fqn, module in model.named_modules() if parametrize.is_parametrized(module)
        for name, parametrizations in module.parametrizations.items()
    }


def _source_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The masks of a model before conversion, from either toolkit, by the
    fqn of the tensor they prune."""
    result = parametrized_masks(model)
    for fqn, module in model.named_modules():
        for _, hook in _prune_hooks(module):
            name = getattr(hook, "_tensor_name", None)
            if isinstance(name, str) and isinstance(module._buffers.get(name + PRUNE_MASK_SUFFIX), torch.Tensor):
                result[f"{fqn}.{name}" if fqn else name] = module._buffers[name + PRUNE_MASK_SUFFIX]
    return result


def _rename_in_place(table: dict, old: str, new: str) -> None:
    """Renames a key of a module's ``_parameters`` or ``_buffers`` where it
    stands, so that ``parameters()`` and ``buffers()`` keep their order."""
    items = [(new if key == old else key, value) for key, value in table.items()]
    table.clear()
    table.update(items)


def _take_prune_hook_away(module: nn.Module, pruned: _PrunedTensor, keep_mask_buffer: bool) -> None:
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


def _apply_plan(module: nn.Module, plan: List[_PrunedTensor], compact_masks: bool, target: str) -> None:
    base = parametrize.type_before_parametrizations(module)
    names = tuple((p.name, p.row) for p in plan)
    parametrized = parametrize.is_parametrized(module)
    # The parametrization's class (and its property) goes first, so that
    # nothing below goes through parametrize's __getattr__/__setattr__ logic.
    module.__class__ = _sparse_class(base, names) if target == "torchscript" else _export_class(base, names)
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
            setattr(module, pruned.name + SPARSITY_SUFFIX, _holder(pruned.row)(mask))
        else:
            # Not persistent: masks stay out of state dicts, as with the
            # parametrization (and an exported program keeps them as constants).
            # prune's own T_mask buffer is replaced where it stands.
            module.register_buffer(pruned.name + MASK_SUFFIX, mask, persistent=False)
        if pruned.bias_hook is not None:
            _replace_bias_hook(module, pruned, target)


def _replace_bias_hook(module: nn.Module, pruned: _PrunedTensor, target: str) -> None:
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
    module.register_forward_hook(_row_mask_bias_hook if target == "torchscript" else _row_mask_bias_hook_export)


def _prune_computed_tensors(model: nn.Module) -> List[torch.Tensor]:
    """The plain attributes ``T`` that torch.nn.utils.prune's hooks compute."""
    return [
        module.__dict__[hook._tensor_name]
        for module in model.modules()
        for _, hook in _prune_hooks(module)
        if isinstance(module.__dict__.get(getattr(hook, "_tensor_name", None)), torch.Tensor)
    ]


def _check_scriptable(converted: Dict[type, Tuple[str, nn.Module]]) -> None:
    for fqn, module in converted.values():
        try:
            torch.jit.script(module)
        except Exception as error:  # TorchScript raises several exception types
            where = f"module '{fqn}'" if fqn else "the model itself"
            raise ConversionError(
                f"{where} ({type(module).__name__}) was converted, but TorchScript cannot compile it "
                f"(does its forward read a pruned tensor other than as self.<name>?): {error}"
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
    plugin's FakeSparsity (see the module docstring for the layout), ready for
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
        _plan_module(fqn, module, target)
    if not inplace:
        # The tensors torch.nn.utils.prune's hooks compute (plain attributes,
        # not graph leaves) refuse deepcopy; the copies go without them.
        memo = {id(tensor): None for tensor in _prune_computed_tensors(model)}
        try:
            model = copy.deepcopy(model, memo)
        except Exception as error:
            raise ConversionError(
                f"copy.deepcopy(model) failed ({error}); convert(model, inplace=True) converts the model itself"
            ) from error
    plans = [(fqn, module, _plan_module(fqn, module, target)) for fqn, module in model.named_modules()]
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


def _pruned_tensor_names(module, suffix: str = SPARSITY_SUFFIX) -> List[str]:
    """Names of the module's own tensors that have a FakeSparsity object
    (``suffix`` "_sparsity") or a mask buffer ("_mask"), not squashed."""
    names = []
    own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    for tensor_name in own:
        if tensor_name.endswith(ORIGINAL_SUFFIX):
            name = tensor_name[: -len(ORIGINAL_SUFFIX)]
            held = getattr(module, name + suffix, None)
            if held is not None and (suffix != MASK_SUFFIX or isinstance(held, torch.Tensor)):
                names.append(name)
    return names


def fake_sparsities(model) -> Dict[str, "torch.ScriptObject"]:
    """The FakeSparsity objects of a converted model (eager or scripted), by
    the fqn of the tensor they prune (``"layer1.0.conv1.weight"``, as in
    torch.ao.pruning). ``fake_sparsities(m)[fqn].mask`` is the live mask."""
    result = {}
    for module_fqn, module in model.named_modules():
        for name in _pruned_tensor_names(module):
            fqn = f"{module_fqn}.{name}" if module_fqn else name
            result[fqn] = getattr(module, name + SPARSITY_SUFFIX)
    return result


_MASK_HOLDER_TYPES = (
    "__torch__.torch.classes.sparsity.FakeSparsity",
    "__torch__.torch.classes.sparsity.FakeStructuredSparsity",
)


def _exported_masks(program) -> Dict[str, torch.Tensor]:
    """The masks of an ExportedProgram: the second input of every
    ``fake_sparsity`` or ``fake_structured_sparsity`` call, by the fqn of the
    tensor in its first input; and those of the FakeSparsity and
    FakeStructuredSparsity objects it holds (a TorchScript-target model
    exported for inference), by the fqn of the tensor they prune."""
    result = {}
    for name, constant in program.constants.items():
        if isinstance(constant, torch.ScriptObject) and constant._type().qualified_name() in _MASK_HOLDER_TYPES:
            if name.endswith(SPARSITY_SUFFIX):
                result[name[: -len(SPARSITY_SUFFIX)]] = constant.mask
    signature = program.graph_signature
    state = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    tensors = {**program.state_dict, **program.constants}
    operators = (torch.ops.sparsity.fake_sparsity.default, torch.ops.sparsity.fake_structured_sparsity.default)
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in operators:
            continue
        x, mask = node.args[:2]
        x_name, mask_name = state.get(getattr(x, "name", None)), state.get(getattr(mask, "name", None))
        if x_name is None or mask_name is None:
            continue  # not a model tensor read straight from the model's state
        fqn = x_name[: -len(ORIGINAL_SUFFIX)] if x_name.endswith(ORIGINAL_SUFFIX) else x_name
        result[fqn] = tensors[mask_name]
    return result


def masks(obj) -> Dict[str, torch.Tensor]:
    """The live masks by tensor fqn (``"layer1.0.conv1.weight"``) of a
    converted model of either target, eager or scripted, or of an
    ``ExportedProgram`` made from one (a TorchScript-target model exports
    non-strict, for inference). Writing into one (``masks(m)[fqn][:8] = 0``)
    changes the next output."""
    if isinstance(obj, torch.export.ExportedProgram):
        return _exported_masks(obj)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"masks expects a converted model or an ExportedProgram, but got {type(obj).__name__}")
    result = {fqn: sparsity.mask for fqn, sparsity in fake_sparsities(obj).items()}
    for module_fqn, module in obj.named_modules():
        for name in _pruned_tensor_names(module, MASK_SUFFIX):
            result[f"{module_fqn}.{name}" if module_fqn else name] = getattr(module, name + MASK_SUFFIX)
    return result


def _row_view(mask: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """A mask as it multiplies ``tensor``: itself, or a row mask reshaped to
    ``[-1, 1, ...]``, as FakeStructuredSparsity does."""
    if mask.shape == tensor.shape:
        return mask
    return mask.reshape(-1, *([1] * (tensor.dim() - 1)))


def _squash_one(module, name: str, mask: torch.Tensor, inplace_op) -> None:
    original = getattr(module, name + ORIGINAL_SUFFIX)
    with torch.no_grad():
        if mask.shape == original.shape:
            inplace_op(original, mask)
        else:
            original.mul_(_row_view(mask, original))  # what fake_structured_sparsity computes
            if name == "weight" and getattr(module, "_bias", None) is not None and getattr(module, "prune_bias", False):
                # The converted BiasHook zeroes the pruned rows of the bias
                # while a mask is held; squashed, the bias holds the zeros.
                module._bias[~(mask != 0)] = 0


def squash(model):
    """Multiplies each mask into its tensor in place and drops the masks, in a
    converted model of either target, eager or scripted. The result computes
    the same outputs and holds no masks. Returns ``model``.

    Target "torchscript" uses the plugin's ``fake_sparsity_`` (scripted code
    can call it too); target "export" uses ``Tensor.mul_``, which is the same
    computation and which torch.compile and AOTInductor accept (they refuse a
    custom operator that returns an alias of its input). A row mask
    multiplies as ``mask.reshape(-1, 1, ...)``, and a structured pruner's
    bias gets its pruned rows zeroed (``prune_bias``)."""
    load_library()
    for module_fqn, module in model.named_modules():
        for name in _pruned_tensor_names(module):
            _squash_one(module, name, getattr(module, name + SPARSITY_SUFFIX).mask, torch.ops.sparsity.fake_sparsity_)
            setattr(module, name + SPARSITY_SUFFIX, None)
        for name in _pruned_tensor_names(module, MASK_SUFFIX):
            _squash_one(module, name, getattr(module, name + MASK_SUFFIX), torch.Tensor.mul_)
            module.register_buffer(name + MASK_SUFFIX, None, persistent=False)
    return model


# -------------------------------------------------------------- command line


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


def main(argv=None) -> int:
    from .sparsifiers import prepare_with_masks, prune_with_weight_norm

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
    parser.add_argument("--aoti-package", metavar="FILE",
                        help="also convert the pruned model with target='export' and compile it into an AOTInductor "
                        "package (torch_sparsity.aoti.compile) for the --input-shape input; sparsity_run reads it")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the input (default 0)")
    args = parser.parse_args(argv)
    if args.sparsity is not None and not 0 <= args.sparsity <= 1:
        parser.error(f"--sparsity must be in [0, 1], got {args.sparsity}")
    if (args.save_input or args.save_output or args.benchmark or args.aoti_package) and not args.input_shape:
        parser.error("--save-input, --save-output, --benchmark and --aoti-package need --input-shape")
    if args.benchmark < 0:
        parser.error("--benchmark must be a number of runs")
    input_shape = _parse_shape(args.input_shape) if args.input_shape else None

    load_library()
    torch.manual_seed(args.seed)
    model = _build_model(args.model).eval()
    weights = _load(args.weights, "--weights", args.trust_files) if args.weights else None
    parametrized_weights = weights is not None and any(".parametrizations." in k or k.startswith("parametrizations.") for k in weights)
    if weights is not None and not parametrized_weights:
        try:
            model.load_state_dict(weights)
        except RuntimeError as error:
            raise SystemExit(f"--weights: {args.weights} does not fit the model: {error}") from None
    if args.sparsity is not None:
        prune_with_weight_norm(model, args.sparsity)
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

    try:
        converted = convert(model, compact_masks=not args.keep_mask_dtype)
    except ConversionError as error:
        print(f"torch_sparsity.convert: cannot convert: {error}", file=sys.stderr)
        return 1
    scripted = torch.jit.script(converted)
    scripted.save(args.output)
    sparsities = fake_sparsities(scripted)
    print(f"converted {len(sparsities)} pruned tensors; scripted model saved to {args.output}")
    print(f"masks: {_describe_masks(sparsities)} "
          f"(as the sparsifier made them: {_describe_masks(_source_masks(model))})")

    if input_shape:
        example = torch.randn(input_shape)
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
            from . import aoti

            start = time.perf_counter()
            exportable = convert(model, compact_masks=not args.keep_mask_dtype, target="export")
            aoti.compile(exportable, (example,), args.aoti_package)
            print(f"AOTInductor package of the same model ({len(masks(exportable))} masks live) saved to "
                  f"{args.aoti_package} (compiled in {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
