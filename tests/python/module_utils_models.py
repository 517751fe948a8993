"""Small modules for the module-utility tests (pytest and the C++ suite's
model files): a linear layer masked by torch.classes.sparsity.FakeSparsity, a
swap_module prototype, and a scripted model whose methods call every
torch.ops.sparsity module operator, and the lookups the tests compare
with. Load the plugin before scripting these."""

import warnings
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit.interface is deprecated

    @torch.jit.interface
    class LinearLike(nn.Module):
        """What a swappable linear slot must offer: the argument name is part of it."""

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            pass


class MaskedLinear(nn.Module):
    """A linear layer whose weight is masked by a FakeSparsity object: the
    layout module_contains_param(module, "FakeSparsity") recognises besides
    PyTorch's parametrize layout."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_sparsity = torch.classes.sparsity.FakeSparsity(mask)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight_sparsity.forward(self.weight), self.bias)


class SparseLinear(nn.Module):
    """A swap_module prototype. swap_module deep-copies it and calls
    from_dense(copy, dense) on the copy; from_dense reads the dense module
    through torch.ops.sparsity.fqn_to_module (a module arrives as Any) and
    squashes the mask into the weight."""

    def __init__(self):
        super().__init__()
        # Placeholders: from_dense replaces them in each copy.
        self.weight = nn.Parameter(torch.empty(0))
        self.bias = nn.Parameter(torch.empty(0))
        self.register_buffer("mask", torch.empty(0))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)

    @torch.jit.export
    def from_dense(self, dense: Any) -> None:
        # A module holding a FakeSparsity object (MaskedLinear) ...
        weight = torch.ops.sparsity.fqn_to_module(dense, "weight")
        mask = torch.ops.sparsity.fqn_to_module(dense, "weight_sparsity.mask")
        if mask is None:
            # ... or PyTorch's parametrize layout, as torch.jit.trace keeps it.
            weight = torch.ops.sparsity.fqn_to_module(dense, "parametrizations.weight.original")
            mask = torch.ops.sparsity.fqn_to_module(dense, "parametrizations.weight.0.mask")
        bias = torch.ops.sparsity.fqn_to_module(dense, "bias")
        assert isinstance(weight, torch.Tensor), "from_dense: the dense module has no weight"
        assert isinstance(mask, torch.Tensor), "from_dense: the dense module has no weight mask"
        self.mask = mask.detach().clone()
        self.weight = weight.detach() * self.mask
        if isinstance(bias, torch.Tensor):
            self.bias = bias.detach().clone()
        else:
            self.bias = torch.zeros(weight.size(0), dtype=weight.dtype, device=weight.device)


class Head(nn.Module):
    fc: LinearLike

    def __init__(self, fc: nn.Module):
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ConvertibleNet(nn.Module):
    """fc1 and head.fc hold FakeSparsity objects and are declared LinearLike, so
    a convert pass can swap them; fc2 is a plain Linear that stays.
    sparse_prototype carries the swap_module prototype along with the model."""

    fc1: LinearLike
    fc2: LinearLike

    def __init__(self):
        super().__init__()
        mask1 = (torch.rand(8, 4) > 0.5).float()
        mask2 = (torch.rand(3, 6) > 0.5).float()
        self.fc1 = MaskedLinear(nn.Linear(4, 8), mask1)
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(8, 6))
        self.fc2 = nn.Linear(6, 6)
        self.head = Head(MaskedLinear(nn.Linear(6, 3), mask2))
        self.sparse_prototype = SparseLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.body(self.fc1(x))))

    # One method per operator, so that tests run each op inside TorchScript.
    @torch.jit.export
    def fqn_of_head_fc(self, prefix: str) -> Optional[str]:
        return torch.ops.sparsity.module_to_fqn(self, self.head.fc, prefix)

    @torch.jit.export
    def fqn_of_prototype_in_body(self) -> Optional[str]:
        return torch.ops.sparsity.module_to_fqn(self.body, self.sparse_prototype)

    @torch.jit.export
    def lookup(self, path: str) -> Any:
        return torch.ops.sparsity.fqn_to_module(self, path)

    @torch.jit.export
    def lookup_tensor(self, path: str) -> Optional[torch.Tensor]:
        found = torch.ops.sparsity.fqn_to_module(self, path)
        if isinstance(found, torch.Tensor):
            return found
        return None

    @torch.jit.export
    def tensor_info(self, tensor_fqn: str) -> Dict[str, Any]:
        return torch.ops.sparsity.get_arg_info_from_tensor_fqn(self, tensor_fqn)

    @torch.jit.export
    def has_fake_sparsity(self, path: str) -> bool:
        return torch.ops.sparsity.module_contains_param(
            torch.ops.sparsity.fqn_to_module(self, path), "FakeSparsity")

    @torch.jit.export
    def swapped_fc1(self) -> Any:
        mapping: Dict[str, Any] = {"MaskedLinear": self.sparse_prototype}
        return torch.ops.sparsity.swap_module(self.fc1, mapping)

    @torch.jit.export
    def swapped_fc2(self) -> Any:
        mapping: Dict[str, Any] = {"MaskedLinear": self.sparse_prototype}
        return torch.ops.sparsity.swap_module(self.fc2, mapping)

    @torch.jit.export
    def convert(self) -> None:
        """torch.ao.pruning's convert, by hand: swap every module that carries
        FakeSparsity and whose class is mapped, and install the replacement."""
        mapping: Dict[str, Any] = {"MaskedLinear": self.sparse_prototype}
        for path in ["fc1", "fc2", "head.fc"]:
            module = torch.ops.sparsity.fqn_to_module(self, path)
            if torch.ops.sparsity.module_contains_param(module, "FakeSparsity"):
                torch.ops.sparsity.set_submodule(
                    self, path, torch.ops.sparsity.swap_module(module, mapping))


def masked_linear_reference(masked: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a MaskedLinear (scripted) computes, written out."""
    return F.linear(x, masked.weight * masked.weight_sparsity.mask, masked.bias)


def same_object(a, b) -> bool:
    """Identity of the TorchScript objects behind two ScriptModule wrappers."""
    return a._c == b._c


def submodule(model, name):
    """model.get_submodule(name), which ScriptModules lack."""
    for piece in name.split(".") if name else []:
        model = getattr(model, piece)
    return model
