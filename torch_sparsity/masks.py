"""The masks of a converted model of either target (eager, scripted or
exported): ``masks`` finds the live ones, ``squash`` multiplies them into
their tensors and drops them, and a few helpers measure and compact them."""

from typing import Dict, List, Tuple

import torch
from torch import nn

from . import load_library
from .naming import MASK_SUFFIX, ORIGINAL_SUFFIX, SPARSITY_SUFFIX

__all__ = ["compact_mask", "fake_sparsities", "mask_bytes", "masks", "squash", "storage_bytes"]


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


def _own_tensors(module) -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) of the module's own parameters and buffers, under every
    name: a tensor tied between two names of the module is read under each
    (named_parameters would list it once)."""
    found = list(module._parameters.items()) + list(module._buffers.items())
    return [(name, tensor) for name, tensor in found if tensor is not None]


def _pruned_tensor_names(module, suffix: str = SPARSITY_SUFFIX) -> List[str]:
    """Names of the module's own tensors that have a FakeSparsity object
    (``suffix`` "_sparsity") or a mask buffer ("_mask"), not squashed."""
    names = []
    for tensor_name, _ in _own_tensors(module):
        if tensor_name.endswith(ORIGINAL_SUFFIX):
            name = tensor_name[: -len(ORIGINAL_SUFFIX)]
            held = getattr(module, name + suffix, None)
            if held is not None and (suffix != MASK_SUFFIX or isinstance(held, torch.Tensor)):
                names.append(name)
    return names


def _first_names(found: Dict[str, object], mask_of) -> Dict[str, object]:
    """``found`` without the entries whose mask (``mask_of(value)``) an
    earlier entry holds: a module reached by several paths holds one mask,
    named after the first path (a scripted model lists every path)."""
    result, seen = {}, {}
    for fqn, value in found.items():
        mask = mask_of(value)
        if id(mask) not in seen:
            seen[id(mask)] = mask  # kept, so that no other tensor gets its id
            result[fqn] = value
    return result


def fake_sparsities(model) -> Dict[str, "torch.ScriptObject"]:
    """The FakeSparsity objects of a converted model (eager or scripted), by
    the fqn of the tensor they prune (``"layer1.0.conv1.weight"``, as in
    torch.ao.pruning; the first path in ``named_modules()`` order where a
    module has several). ``fake_sparsities(m)[fqn].mask`` is the live mask."""
    result = {}
    for module_fqn, module in model.named_modules():
        for name in _pruned_tensor_names(module):
            fqn = f"{module_fqn}.{name}" if module_fqn else name
            result[fqn] = getattr(module, name + SPARSITY_SUFFIX)
    return _first_names(result, lambda sparsity: sparsity.mask)


_MASK_HOLDER_TYPES = (
    "__torch__.torch.classes.sparsity.FakeSparsity",
    "__torch__.torch.classes.sparsity.FakeStructuredSparsity",
)


def _alias_key(tensor: torch.Tensor):
    """Equal for two tensors that are one tensor of the model: the same
    object, or, in a program loaded from a file, the same view of one
    storage (torch.export.load restores aliases so)."""
    storage = tensor.untyped_storage()
    if storage.data_ptr() == 0:  # no data to tell it by (meta, empty)
        return id(tensor)
    where = (storage.data_ptr(), tensor.device, tensor.storage_offset())
    return where + (tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def exported_mask_reads(program, tensors=None) -> Dict[str, Tuple[str, str]]:
    """For each ``fake_sparsity`` or ``fake_structured_sparsity`` call of an
    ExportedProgram on a tensor and a mask buffer of the model: the pruned
    tensor's fqn -> (the mask buffer's fqn, the tensor's fqn), both as the
    graph reads them. The pruned tensor is named after its mask buffer
    (``<module>.T_mask`` names ``<module>.T``): where a module is reached by
    several paths, non-strict torch.export lists the buffer under each and
    reads it through the last, and the name is the first, in the model's
    ``named_modules()`` order (strict export keeps the last alone).
    ``tensors``: the program's state_dict and constants in one dict, where
    the caller has it."""
    signature = program.graph_signature
    state = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    tensors = {**program.state_dict, **program.constants} if tensors is None else tensors
    first = {}
    for name in signature.inputs_to_buffers.values():  # in named_buffers() order
        if name.endswith(MASK_SUFFIX):
            first.setdefault(_alias_key(tensors[name]), name)
    operators = (torch.ops.sparsity.fake_sparsity.default, torch.ops.sparsity.fake_structured_sparsity.default)
    result = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in operators:
            continue
        x, mask = node.args[:2]
        x_name, mask_name = state.get(getattr(x, "name", None)), state.get(getattr(mask, "name", None))
        if x_name is None or mask_name is None:
            continue  # not a model tensor read straight from the model's state
        named = first.get(_alias_key(tensors[mask_name]))
        if named is not None:
            fqn = named[: -len(MASK_SUFFIX)]
        else:  # a mask buffer of another name: the tensor names it
            fqn = x_name[: -len(ORIGINAL_SUFFIX)] if x_name.endswith(ORIGINAL_SUFFIX) else x_name
        result[fqn] = (mask_name, x_name)
    return result


def _exported_masks(program) -> Dict[str, torch.Tensor]:
    """The masks of an ExportedProgram: those the graph reads through
    ``fake_sparsity`` or ``fake_structured_sparsity`` (``exported_mask_reads``),
    and those of the FakeSparsity and FakeStructuredSparsity objects it holds
    (a TorchScript-target model exported for inference), by the fqn of the
    tensor they prune."""
    result = {}
    for name, constant in program.constants.items():
        if isinstance(constant, torch.ScriptObject) and constant._type().qualified_name() in _MASK_HOLDER_TYPES:
            if name.endswith(SPARSITY_SUFFIX):
                result[name[: -len(SPARSITY_SUFFIX)]] = constant.mask
    tensors = {**program.state_dict, **program.constants}
    for fqn, (mask_name, _) in exported_mask_reads(program, tensors).items():
        result[fqn] = tensors[mask_name]
    return result


def masks(obj) -> Dict[str, torch.Tensor]:
    """The live masks by tensor fqn (``"layer1.0.conv1.weight"``) of a
    converted model of either target, eager or scripted, or of an
    ``ExportedProgram`` made from one (a TorchScript-target model exports
    non-strict, for inference). Writing into one (``masks(m)[fqn][:8] = 0``)
    changes the next output. A mask is listed once: a module reached by
    several paths (a shared submodule) holds one, named after the first path
    in ``named_modules()`` order; a tensor tied between modules has a mask
    per module that prunes it, each named after its module, and one held
    under two names of a module a mask per pruned name."""
    if isinstance(obj, torch.export.ExportedProgram):
        return _exported_masks(obj)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"masks expects a converted model or an ExportedProgram, but got {type(obj).__name__}")
    result = {fqn: sparsity.mask for fqn, sparsity in fake_sparsities(obj).items()}
    for module_fqn, module in obj.named_modules():
        for name in _pruned_tensor_names(module, MASK_SUFFIX):
            result[f"{module_fqn}.{name}" if module_fqn else name] = getattr(module, name + MASK_SUFFIX)
    return _first_names(result, lambda mask: mask)


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


def _check_untied(model) -> None:
    """Refuses a model where a pruned tensor is also read under another mask
    or none (a tied weight, ``head.weight = emb.weight``): one product cannot
    stand for both readers."""
    readers = {}  # id(tensor) -> (tensor, {id(mask) or None: fqn})
    for module_fqn, module in model.named_modules():
        held = {name: getattr(module, name + SPARSITY_SUFFIX).mask for name in _pruned_tensor_names(module)}
        held.update({name: getattr(module, name + MASK_SUFFIX) for name in _pruned_tensor_names(module, MASK_SUFFIX)})
        prefix = f"{module_fqn}." if module_fqn else ""
        for name, tensor in _own_tensors(module):
            pruned = name[: -len(ORIGINAL_SUFFIX)] if name.endswith(ORIGINAL_SUFFIX) else None
            mask = held.get(pruned)
            fqn = prefix + (pruned if mask is not None else name)
            entry = readers.setdefault(id(tensor), (tensor, {}))
            entry[1].setdefault(None if mask is None else id(mask), fqn)
    for tensor, by_mask in readers.values():
        if len(by_mask) > 1 and any(key is not None for key in by_mask):
            names = " and ".join(sorted(by_mask.values()))
            raise RuntimeError(
                f"squash: {names} are one tensor (tied) read through different masks or none; multiplying a mask "
                "into it would change the others' results: untie them first (give one a copy of the tensor)"
            )


def squash(model):
    """Multiplies each mask into its tensor in place and drops the masks, in a
    converted model of either target, eager or scripted. The result computes
    the same outputs and holds no masks. Returns ``model``.

    Target "torchscript" uses the plugin's ``fake_sparsity_`` (scripted code
    can call it too); target "export" uses ``Tensor.mul_``, which is the same
    computation and which torch.compile and AOTInductor accept (they refuse a
    custom operator that returns an alias of its input). A row mask
    multiplies as ``mask.reshape(-1, 1, ...)``, and a structured pruner's
    bias gets its pruned rows zeroed (``prune_bias``). A pruned tensor tied
    to another module's tensor or to another name of its module (read there
    under another mask or none) is a RuntimeError, before anything changes."""
    load_library()
    _check_untied(model)
    squashed = {}  # a scripted model lists a module reached by several paths under each
    for module_fqn, module in model.named_modules():
        for name in _pruned_tensor_names(module):
            mask = getattr(module, name + SPARSITY_SUFFIX).mask
            if id(mask) not in squashed:
                squashed[id(mask)] = mask
                _squash_one(module, name, mask, torch.ops.sparsity.fake_sparsity_)
            setattr(module, name + SPARSITY_SUFFIX, None)
        for name in _pruned_tensor_names(module, MASK_SUFFIX):
            _squash_one(module, name, getattr(module, name + MASK_SUFFIX), torch.Tensor.mul_)
            module.register_buffer(name + MASK_SUFFIX, None, persistent=False)
    return model


