"""Converts a model pruned with torch.ao.pruning into one that torch.jit.script
accepts, with its masks still live in the plugin's FakeSparsity.

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
from torch.nn.utils import parametrize

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


_sparse_classes: Dict[Tuple[type, Tuple[str, ...]], type] = {}


def _sparse_class(base: type, names: Tuple[str, ...]) -> type:
    """The subclass of ``base`` whose tensors ``names`` go through FakeSparsity."""
    key = (base, names)
    if key not in _sparse_classes:
        annotations = _base_annotations(base)
        fake_sparsity_type = Optional[torch.classes.sparsity.FakeSparsity]
        namespace = {"__module__": __name__, "__qualname__": base.__qualname__}
        for name in names:
            # Optional, so that squash can drop the mask (TorchScript checks
            # the type of every attribute assignment, from C++ too).
            annotations[name + SPARSITY_SUFFIX] = fake_sparsity_type
            namespace[name] = property(
                _masked_getter(name), doc=f"{name}{SPARSITY_SUFFIX}.forward({name}{ORIGINAL_SUFFIX})"
            )
        namespace["__annotations__"] = annotations
        _sparse_classes[key] = type(base.__name__, (base,), namespace)
    for name in names:
        _masked_getter(name)  # registers the source again if linecache was cleared
    return _sparse_classes[key]


def _export_getter(name: str):
    """The getter of property ``name`` for target "export": plain Python,
    which torch.export and torch.compile trace (the operator's Meta kernel
    gives shapes, its C++ autograd the backward)."""
    original, mask = name + ORIGINAL_SUFFIX, name + MASK_SUFFIX

    def getter(self):
        held = getattr(self, mask)
        if held is None:  # squashed
            return getattr(self, original)
        return torch.ops.sparsity.fake_sparsity(getattr(self, original), held)

    getter.__name__ = name
    return getter


_export_classes: Dict[Tuple[type, Tuple[str, ...]], type] = {}


def _export_class(base: type, names: Tuple[str, ...]) -> type:
    """The subclass of ``base`` whose tensors ``names`` read their masks."""
    key = (base, names)
    if key not in _export_classes:
        namespace = {"__module__": __name__, "__qualname__": base.__qualname__}
        for name in names:
            namespace[name] = property(
                _export_getter(name), doc=f"fake_sparsity({name}{ORIGINAL_SUFFIX}, {name}{MASK_SUFFIX})"
            )
        _export_classes[key] = type(base.__name__, (base,), namespace)
    return _export_classes[key]


# ------------------------------------------------------------------ convert


class _PrunedTensor:
    """What the conversion moves for one pruned tensor of a module."""

    def __init__(self, name, original, is_parameter, persistent, mask):
        self.name = name
        self.original = original
        self.is_parameter = is_parameter
        self.persistent = persistent
        self.mask = mask


def _plan_module(fqn: str, module: nn.Module, target: str = "torchscript") -> List[_PrunedTensor]:
    """Checks that every parametrization of ``module`` can be converted and
    collects what moves; raises ConversionError naming the module otherwise."""
    fake_sparsity_class = _torch_ao_fake_sparsity()
    base = parametrize.type_before_parametrizations(module)
    where = f"module '{fqn}' ({base.__name__})" if fqn else f"the model itself ({base.__name__})"
    if isinstance(module, nn.RNNBase):
        raise ConversionError(
            f"{where}: recurrent layers read their weights through the list _flat_weights, which "
            "TorchScript keeps as a plain attribute, so masks could not apply"
        )
    plan = []
    for name, parametrizations in module.parametrizations.items():
        kinds = [type(p).__name__ for p in parametrizations]
        if len(parametrizations) != 1 or not isinstance(parametrizations[0], fake_sparsity_class):
            raise ConversionError(
                f"{where}: tensor '{name}' has the parametrizations {kinds}; only a single "
                "torch.ao.pruning FakeSparsity per tensor can be converted"
            )
        if not hasattr(parametrizations, "original"):
            raise ConversionError(
                f"{where}: tensor '{name}' is stored as several tensors (original0, original1, ...); "
                "FakeSparsity keeps one"
            )
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ConversionError(
                f"{where}: tensor '{name}' is not a Python identifier, so TorchScript code cannot read it"
            )
        for attribute in (name + ORIGINAL_SUFFIX, name + (SPARSITY_SUFFIX if target == "torchscript" else MASK_SUFFIX)):
            if hasattr(module, attribute):
                raise ConversionError(
                    f"{where}: cannot hold tensor '{name}' as '{attribute}', the module already has "
                    "an attribute of that name"
                )
        original = parametrizations.original
        mask = parametrizations[0].mask
        if not original.is_floating_point():
            raise ConversionError(
                f"{where}: tensor '{name}' has dtype {original.dtype}; the plugin's FakeSparsity "
                "takes floating tensors only"
            )
        if mask.shape != original.shape:
            raise ConversionError(
                f"{where}: the mask of tensor '{name}' has shape {tuple(mask.shape)} but the tensor "
                f"has {tuple(original.shape)}; the plugin's FakeSparsity needs equal shapes"
            )
        try:
            torch.classes.sparsity.FakeSparsity(mask)  # the plugin's own checks (dtype, layout)
        except RuntimeError as error:
            raise ConversionError(f"{where}: the mask of tensor '{name}' is refused: {error}") from None
        is_parameter = "original" in parametrizations._parameters
        persistent = "original" not in parametrizations._non_persistent_buffers_set
        plan.append(_PrunedTensor(name, original, is_parameter, persistent, mask))
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


def _apply_plan(module: nn.Module, plan: List[_PrunedTensor], compact_masks: bool, target: str) -> None:
    base = parametrize.type_before_parametrizations(module)
    names = tuple(p.name for p in plan)
    # The parametrization's class (and its property) goes first, so that
    # nothing below goes through parametrize's __getattr__/__setattr__ logic.
    module.__class__ = _sparse_class(base, names) if target == "torchscript" else _export_class(base, names)
    del module._modules["parametrizations"]
    for pruned in plan:
        if pruned.is_parameter:
            module.register_parameter(pruned.name + ORIGINAL_SUFFIX, pruned.original)
        else:
            module.register_buffer(pruned.name + ORIGINAL_SUFFIX, pruned.original, persistent=pruned.persistent)
        mask = compact_mask(pruned.mask, pruned.original) if compact_masks else pruned.mask
        if target == "torchscript":
            setattr(module, pruned.name + SPARSITY_SUFFIX, torch.classes.sparsity.FakeSparsity(mask))
        else:
            # Not persistent: masks stay out of state dicts, as with the
            # parametrization (and an exported program keeps them as constants).
            module.register_buffer(pruned.name + MASK_SUFFIX, mask, persistent=False)


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
    torch.ao.pruning replaced by the plugin's FakeSparsity (see the module
    docstring for the layout), ready for ``torch.jit.script``; with
    ``target="export"``, by mask buffers read through the
    ``fake_sparsity`` operator, ready for torch.export, AOTInductor and
    torch.compile.

    With ``inplace=False`` (the default) the model is deep-copied first, so the
    masks are copies; with ``inplace=True`` the model itself is changed and the
    FakeSparsity objects hold the sparsifier's very mask tensors.
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
    is changed.
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
        if parametrize.is_parametrized(module):
            _plan_module(fqn, module, target)
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as error:
            raise ConversionError(
                f"copy.deepcopy(model) failed ({error}); convert(model, inplace=True) converts the model itself"
            ) from error
    plans = [
        (fqn, module, _plan_module(fqn, module, target))
        for fqn, module in model.named_modules()
        if parametrize.is_parametrized(module)
    ]
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


_FAKE_SPARSITY_TYPE = "__torch__.torch.classes.sparsity.FakeSparsity"


def _exported_masks(program) -> Dict[str, torch.Tensor]:
    """The masks of an ExportedProgram: the second input of every
    ``fake_sparsity`` call, by the fqn of the tensor in its first input;
    and those of the FakeSparsity objects it holds (a TorchScript-target
    model exported for inference), by the fqn of the tensor they prune."""
    result = {}
    for name, constant in program.constants.items():
        if isinstance(constant, torch.ScriptObject) and constant._type().qualified_name() == _FAKE_SPARSITY_TYPE:
            if name.endswith(SPARSITY_SUFFIX):
                result[name[: -len(SPARSITY_SUFFIX)]] = constant.mask
    signature = program.graph_signature
    state = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    tensors = {**program.state_dict, **program.constants}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.sparsity.fake_sparsity.default:
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


def squash(model):
    """Multiplies each mask into its tensor in place and drops the masks, in a
    converted model of either target, eager or scripted. The result computes
    the same outputs and holds no masks. Returns ``model``.

    Target "torchscript" uses the plugin's ``fake_sparsity_`` (scripted code
    can call it too); target "export" uses ``Tensor.mul_``, which is the same
    computation and which torch.compile and AOTInductor accept (they refuse a
    custom operator that returns an alias of its input)."""
    load_library()
    for module_fqn, module in model.named_modules():
        for name in _pruned_tensor_names(module):
            sparsity = getattr(module, name + SPARSITY_SUFFIX)
            with torch.no_grad():
                torch.ops.sparsity.fake_sparsity_(getattr(module, name + ORIGINAL_SUFFIX), sparsity.mask)
            setattr(module, name + SPARSITY_SUFFIX, None)
        for name in _pruned_tensor_names(module, MASK_SUFFIX):
            with torch.no_grad():
                getattr(module, name + ORIGINAL_SUFFIX).mul_(getattr(module, name + MASK_SUFFIX))
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
          f"(as the sparsifier made them: {_describe_masks(parametrized_masks(model))})")

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
