"""Target "export" of ``convert``, for torch.export, AOTInductor and
torch.compile: a module ``m`` of class ``C`` with a pruned tensor ``T`` gets
``m.T_original``, the mask as a non-persistent buffer ``m.T_mask`` (never in
a state dict; a constant of an exported program) and a subclass of ``C``,
also named ``C``, whose plain Python property ``T`` returns
``torch.ops.sparsity.fake_sparsity(m.T_original, m.T_mask)``. The operator
has a Meta kernel and autograd in C++, so export and compile trace through it;
see docs/end_to_end.md."""

from typing import Dict, Tuple

import torch

from .naming import MASK_SUFFIX, ORIGINAL_SUFFIX
from .sources import add_bias

__all__ = ["export_class", "row_mask_bias_hook"]

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


_export_classes: Dict[Tuple[type, Tuple[Tuple[str, bool], ...], bool], type] = {}


def export_class(base: type, names: Tuple[Tuple[str, bool], ...], bias_hook: bool = False) -> type:
    """The subclass of ``base`` whose tensors ``names`` ((name, row mask)
    pairs) read their masks."""
    # torch.compile does not guard on hooks: a module with the bias hook
    # needs a class of its own, or compiled code of one without it is reused.
    key = (base, names, bias_hook)
    if key not in _export_classes:
        namespace = {
            "__module__": __name__,
            "__qualname__": base.__qualname__,
            # pickle cannot find a class made by type() by its name: it
            # records how to make it again instead.
            "__reduce_ex__": lambda self, protocol: (_rebuild, (base, names, bias_hook), self.__getstate__()),
        }
        for name, row in names:
            op = "fake_structured_sparsity" if row else "fake_sparsity"
            namespace[name] = property(
                _export_getter(name, row), doc=f"{op}({name}{ORIGINAL_SUFFIX}, {name}{MASK_SUFFIX})"
            )
        _export_classes[key] = type(base.__name__, (base,), namespace)
    return _export_classes[key]


def _rebuild(base: type, names: Tuple[Tuple[str, bool], ...], bias_hook: bool = False) -> torch.nn.Module:
    """An empty module of ``export_class(base, names)``, which pickle fills
    with the pickled module's state (nn.Module.__setstate__)."""
    cls = export_class(base, names, bias_hook)
    return cls.__new__(cls)


def row_mask_bias_hook(module, input, output):
    """BiasHook for target "export"."""
    return add_bias(output, module._bias, module.weight_mask, module.prune_bias, False)

