"""The masks of a converted model of either target (eager, scripted or
exported): ``masks`` finds the live ones, ``squash`` multiplies them into
their tensors and drops them, and a few helpers measure and compact them."""

from typing import Dict, List

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


