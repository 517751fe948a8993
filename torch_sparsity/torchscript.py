"""Target "torchscript" of ``convert``: a module ``m`` of class ``C`` with a
pruned tensor ``T`` gets ``m.T_original`` (the tensor the mask applies to),
``m.T_sparsity`` (a ``torch.classes.sparsity.FakeSparsity``, or
``FakeStructuredSparsity`` for a row mask, holding the mask) and a subclass of
``C``, also named ``C``, whose property ``T`` returns
``m.T_sparsity.forward(m.T_original)`` (``m.T_original`` once squashed).
TorchScript compiles properties, so ``C.forward`` runs unchanged; see
docs/end_to_end.md for the whole layout."""

import inspect
import linecache
from typing import Dict, Optional, Tuple

import torch

from .naming import ORIGINAL_SUFFIX, SPARSITY_SUFFIX
from .sources import add_bias

__all__ = ["row_mask_bias_hook", "sparse_class"]

_getters: Dict[str, object] = {}
_getter_sources: Dict[str, Tuple[str, str]] = {}


def _register_source(filename: str, source: str) -> None:
    # TorchScript compiles a property from its source, which it reads through
    # inspect (linecache). An mtime of None keeps linecache.checkcache from
    # dropping the entry.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def _masked_getter(name: str):
    """The getter of property ``name``: TorchScript's getattr needs a literal
    attribute name, so the getter's source is generated for each name.
    Scripted, it first gives a floating mask the tensor's floating dtype
    (``follow_dtype``): a scripted module's ``.half()`` cannot reach the mask
    (eager, ``_apply_to_masks`` converts it)."""
    if name not in _getters:
        source = (
            f"def {name}(self):\n"
            f"    sparsity = self.{name}{SPARSITY_SUFFIX}\n"
            f"    if sparsity is None:\n"
            f"        return self.{name}{ORIGINAL_SUFFIX}\n"
            f"    if torch.jit.is_scripting():\n"
            f"        sparsity.follow_dtype(self.{name}{ORIGINAL_SUFFIX})\n"
            f"    return sparsity.forward(self.{name}{ORIGINAL_SUFFIX})\n"
        )
        filename = f"<torch_sparsity.torchscript: getter of {name}>"
        namespace = {"__name__": __name__, "torch": torch}
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


_sparse_classes: Dict[Tuple[type, Tuple[Tuple[str, bool], ...], bool], type] = {}


def sparse_class(base: type, names: Tuple[Tuple[str, bool], ...], bias_hook: bool = False) -> type:
    """The subclass of ``base`` whose tensors go through FakeSparsity, or
    FakeStructuredSparsity for those of ``names`` ((name, row mask) pairs)
    that have a row mask."""
    # torch.compile does not guard on hooks: a module with the bias hook
    # needs a class of its own, or compiled code of one without it is reused.
    key = (base, names, bias_hook)
    if key not in _sparse_classes:
        annotations = _base_annotations(base)
        namespace = {
            "__module__": __name__,
            "__qualname__": base.__qualname__,
            # pickle cannot find a class made by type() by its name: it
            # records how to make it again instead.
            "__reduce_ex__": lambda self, protocol: (_rebuild, (base, names, bias_hook), self.__getstate__()),
            "_apply": lambda self, fn, recurse=True: _apply_to_masks(base._apply(self, fn, recurse), fn, names),
        }
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


def _apply_to_masks(module: torch.nn.Module, fn, names: Tuple[Tuple[str, bool], ...]) -> torch.nn.Module:
    """What nn.Module._apply (``.to()``, ``.half()``, ``.cuda()``...) does to
    buffers, done to the held masks: ``fn`` decides (``.half()`` converts
    floating masks only), and the mask keeps its identity, as parameters do."""
    for name, _ in names:
        sparsity = getattr(module, name + SPARSITY_SUFFIX)
        if sparsity is not None:
            mask = sparsity.mask
            with torch.no_grad():
                applied = fn(mask)
            if applied is not mask:
                mask.data = applied
    return module


def _rebuild(base: type, names: Tuple[Tuple[str, bool], ...], bias_hook: bool = False) -> torch.nn.Module:
    """An empty module of ``sparse_class(base, names)``, which pickle fills
    with the pickled module's state (nn.Module.__setstate__)."""
    cls = sparse_class(base, names, bias_hook)
    return cls.__new__(cls)


def row_mask_bias_hook(module, input: Tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """BiasHook for target "torchscript" (TorchScript compiles the hook)."""
    sparsity = module.weight_sparsity
    mask: Optional[torch.Tensor] = None
    if sparsity is not None:
        mask = sparsity.get_mask()  # a method: tracing cannot reach the property of a faked object
    return add_bias(output, module._bias, mask, module.prune_bias, True)
