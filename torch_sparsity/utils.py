"""torch.ao.pruning.sparsifier.utils for ScriptModules (scripted or traced).

Same names and arguments as the PyTorch functions; each calls the
``torch.ops.sparsity`` operator of that name on the modules' ``._c`` and hands
modules back as ScriptModules. Call ``torch_sparsity.load_library()`` first.

Differences that TorchScript imposes:

- classes are named by strings: ``module_contains_param`` and the keys of
  ``swap_module``'s mapping take class names (a class is turned into its
  ``__name__``), and mapping keys are the class name before parametrizations
  (a traced parametrized ``nn.Linear`` is ``"Linear"``);
- ``swap_module``'s mapping values are prototype ScriptModules with a scripted
  ``from_dense(self, dense: Any) -> None``; the replacement is a deep copy of
  the prototype that ``from_dense`` fills in;
- identity is that of the underlying TorchScript objects: compare modules with
  ``a._c == b._c`` (two ScriptModule wrappers of one object are not ``is``).
"""

from typing import Any, Dict, Optional, Union

import torch
from torch.jit._recursive import wrap_cpp_module

__all__ = [
    "module_to_fqn",
    "fqn_to_module",
    "get_arg_info_from_tensor_fqn",
    "module_contains_param",
    "swap_module",
    "set_submodule",
]


def _cpp(module):
    """The TorchScript object behind a ScriptModule; other values pass through,
    so the operator reports what was wrong with them."""
    return module._c if isinstance(module, torch.jit.ScriptModule) else module


def _wrap(value):
    """A module the operator returned, as a ScriptModule."""
    if isinstance(value, torch._C.ScriptModule):
        return wrap_cpp_module(value)
    return value


def _class_name(cls: Union[str, type]) -> str:
    if isinstance(cls, str):
        return cls
    if isinstance(cls, type):
        return cls.__name__
    # torch.classes.* (torch.ScriptClass) do not expose their name.
    raise TypeError(
        f"expected a class or a class name, but got {cls!r}; "
        "for a TorchScript custom class pass its name, e.g. 'FakeSparsity'"
    )


def module_to_fqn(model, module, prefix: str = "") -> Optional[str]:
    """The fqn of ``module`` inside ``model``, or None if it is not a descendant."""
    return torch.ops.sparsity.module_to_fqn(_cpp(model), _cpp(module), prefix)


def _cached_wrapper(model, path: str, found):
    """The ScriptModule wrapper that ``model`` already holds for the module
    ``found`` at ``path``, so that results are ``is``-identical to
    ``model.<path>`` as in PyTorch; None if there is none."""
    wrapper = model
    for piece in path.split(".") if path else []:
        if not isinstance(wrapper, torch.jit.ScriptModule) or piece not in wrapper._modules:
            return None
        wrapper = wrapper._modules[piece]
    return wrapper if isinstance(wrapper, torch.jit.ScriptModule) and wrapper._c == found else None


def fqn_to_module(model, path: str):
    """The submodule, parameter, buffer or attribute named by ``path``, or None."""
    result = torch.ops.sparsity.fqn_to_module(_cpp(model), path)
    if isinstance(result, torch._C.ScriptModule) and isinstance(model, torch.jit.ScriptModule):
        cached = _cached_wrapper(model, path, result)
        if cached is not None:
            return cached
    return _wrap(result)


def get_arg_info_from_tensor_fqn(model, tensor_fqn: str) -> Dict[str, Any]:
    """``module_fqn``, ``module``, ``tensor_name`` and ``tensor_fqn`` of a tensor fqn."""
    info = torch.ops.sparsity.get_arg_info_from_tensor_fqn(_cpp(model), tensor_fqn)
    # A module nested in a returned dict reaches Python as a plain
    # ScriptObject; fetch it once more so that it comes back as a ScriptModule.
    info["module"] = fqn_to_module(model, info["module_fqn"])
    return info


def module_contains_param(module, parametrization: Union[str, type]) -> bool:
    """Whether ``module`` carries a parametrization of that class (or class name)."""
    return torch.ops.sparsity.module_contains_param(_cpp(module), _class_name(parametrization))


def swap_module(mod, mapping: Dict[Union[str, type], Any]):
    """``mod`` itself, or the replacement built by its prototype's ``from_dense``."""
    cpp_mapping = {_class_name(key): _cpp(prototype) for key, prototype in mapping.items()}
    result = torch.ops.sparsity.swap_module(_cpp(mod), cpp_mapping)
    # Hand back the caller's own wrapper when nothing was swapped.
    if isinstance(mod, torch.jit.ScriptModule) and result == mod._c:
        return mod
    return _wrap(result)


def set_submodule(parent, name: str, new_module) -> None:
    """Installs ``new_module`` as the submodule ``name`` (dotted path) of ``parent``.

    The attribute must be declared with a module interface type that
    ``new_module`` implements, or with exactly its type.
    """
    torch.ops.sparsity.set_submodule(_cpp(parent), name, _cpp(new_module))
    if isinstance(parent, torch.jit.ScriptModule):
        # A ScriptModule keeps Python wrappers of its submodules; replace the
        # stale one so that attribute access from Python sees the new module.
        owner_path, _, attribute = name.rpartition(".")
        owner = parent
        for piece in owner_path.split(".") if owner_path else []:
            owner = getattr(owner, piece)  # ScriptModules lack get_submodule
        if not isinstance(new_module, torch.jit.ScriptModule):
            new_module = wrap_cpp_module(owner._c.getattr(attribute))
        owner._modules[attribute] = new_module
