"""The scripted models the fuzz targets work on. TorchScript compiles these
classes from this file's source: do not edit it while a fuzz run is going.
Import torch_sparsity (which loads the plugin) before scripting them."""

import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit.interface is deprecated

    @torch.jit.interface
    class FuzzLinearLike(nn.Module):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            pass


# ------------------------------------------------------------ pickled_state


class TwoHolders(nn.Module):
    """One attribute of each custom class: the archive whose pickled states
    the pickled_state target rewrites. Input: a (4, 3) tensor."""

    def __init__(self, mask: torch.Tensor, row_mask: torch.Tensor):
        super().__init__()
        self.unstructured = torch.classes.sparsity.FakeSparsity(mask)
        self.structured = torch.classes.sparsity.FakeStructuredSparsity(row_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.structured.forward(self.unstructured.forward(x))


# ------------------------------------------------------------ module_utils_fqn


class MaskedLinear(nn.Module):
    """A linear layer that holds both custom classes (weight and row masks)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_sparsity = torch.classes.sparsity.FakeSparsity((torch.rand(linear.weight.shape) > 0.5).float())
        self.row_sparsity = torch.classes.sparsity.FakeStructuredSparsity(torch.ones(linear.weight.shape[0]))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.row_sparsity.forward(self.weight_sparsity.forward(self.weight))
        return F.linear(input, weight, self.bias)


class Slot(nn.Module):
    """An interface-typed slot: what set_submodule may fill with any
    FuzzLinearLike module (and where a cycle could be made)."""

    slot: FuzzLinearLike

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.slot = inner

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.slot(input)


class Properties(nn.Module):
    """Properties on the path: one that raises when fail is set, one that
    hands out a tensor."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.fail = False  # scripting reads each property once

    @property
    def broken(self) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("fuzz: this property getter raises")
        return self.inner.weight

    @property
    def inner_bias(self) -> Optional[torch.Tensor]:
        return self.inner.bias

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.inner(input)


class SparsePrototype(nn.Module):
    """A swap_module prototype whose from_dense reads a MaskedLinear or a
    plain Linear through fqn_to_module."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(0))
        self.bias = nn.Parameter(torch.empty(0))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)

    @torch.jit.export
    def from_dense(self, dense: Any) -> None:
        weight = torch.ops.sparsity.fqn_to_module(dense, "weight")
        mask = torch.ops.sparsity.fqn_to_module(dense, "weight_sparsity.mask")
        bias = torch.ops.sparsity.fqn_to_module(dense, "bias")
        assert isinstance(weight, torch.Tensor), "from_dense: the dense module has no weight"
        if isinstance(mask, torch.Tensor):
            self.weight = weight.detach() * mask
        else:
            self.weight = weight.detach().clone()
        if isinstance(bias, torch.Tensor):
            self.bias = bias.detach().clone()
        else:
            self.bias = torch.zeros(weight.size(0))


class FuzzNet(nn.Module):
    """Nested modules, ModuleList, ModuleDict, interface-typed slots,
    custom-class attributes, properties (one raising), and plain
    attributes of several types; methods that call the module operators
    from inside TorchScript. Input: a (2, 4) tensor."""

    fc1: FuzzLinearLike

    def __init__(self):
        super().__init__()
        self.fc1 = MaskedLinear(nn.Linear(4, 8))
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 8))])
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 3), "b": Slot(MaskedLinear(nn.Linear(8, 3)))})
        self.props = Properties()
        self.nested = Slot(Slot(nn.Linear(8, 8)))
        self.plain = nn.Linear(8, 8)
        self.sparse_prototype = SparsePrototype()
        self.register_buffer("running", torch.zeros(8))
        self.counter = 3
        self.scale = 0.5
        self.tag = "fuzz"
        self.names: List[str] = ["a", "b"]
        self.table: Dict[str, int] = {"a": 1}
        self.holder = torch.classes.sparsity.FakeSparsity(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for block in self.blocks:
            x = block(x)
        x = self.nested(self.plain(self.props(x))) + self.running
        return self.heads["a"](x) + self.heads["b"](x) * self.scale

    @torch.jit.export
    def lookup(self, path: str) -> Any:
        return torch.ops.sparsity.fqn_to_module(self, path)

    @torch.jit.export
    def tensor_info(self, tensor_fqn: str) -> Dict[str, Any]:
        return torch.ops.sparsity.get_arg_info_from_tensor_fqn(self, tensor_fqn)

    @torch.jit.export
    def contains(self, path: str, name: str) -> bool:
        return torch.ops.sparsity.module_contains_param(torch.ops.sparsity.fqn_to_module(self, path), name)

    @torch.jit.export
    def install(self, path: str, new_module: Any) -> None:
        torch.ops.sparsity.set_submodule(self, path, new_module)
