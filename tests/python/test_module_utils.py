"""The module utilities (torch.ops.sparsity.* and torch_sparsity.utils) against
torch.ao.pruning.sparsifier.utils, on scripted and traced torchvision models:
the lookups (module_to_fqn, fqn_to_module, get_arg_info_from_tensor_fqn,
module_contains_param). Swapping and setting submodules, and the operators
inside TorchScript: test_module_swaps.py."""

import pytest
import torch
import torchvision
from torch import nn
from torch.ao.pruning.sparsifier import utils as ao_utils

from end_to_end_models import example_input, pruned_eager_model
from module_utils_models import (
    ConvertibleNet,
    MaskedLinear,
    same_object,
    submodule,
)
from torch_sparsity import utils

# torch.jit.script/trace/interface warn that they are deprecated.
# Tracing torch.ao.pruning's FakeSparsity warns about its shape check.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

ARCHITECTURES = ["resnet18", "mobilenet_v3_small", "squeezenet1_0"]


@pytest.fixture(scope="module", params=[(a, k) for a in ARCHITECTURES for k in ("scripted", "traced")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def vision_pair(request):
    """(eager model, the same model scripted or traced)."""
    arch, kind = request.param
    torch.manual_seed(0)
    eager = getattr(torchvision.models, arch)(weights=None).eval()
    jit_model = torch.jit.script(eager) if kind == "scripted" else torch.jit.trace(eager, example_input())
    return eager, jit_model


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v3_small"])
def pruned_pair(request):
    eager = pruned_eager_model(request.param)
    return eager, torch.jit.trace(eager, example_input())


# ---------------------------------------------------------------- module_to_fqn


def test_module_to_fqn_every_submodule(vision_pair):
    eager, jit_model = vision_pair
    names = [name for name, _ in eager.named_modules(remove_duplicate=False)]
    assert len(names) > 20
    for name in names:
        expected = ao_utils.module_to_fqn(eager, eager.get_submodule(name))
        assert expected == name
        jit_submodule = submodule(jit_model, name)
        assert utils.module_to_fqn(jit_model, jit_submodule) == expected
        assert utils.module_to_fqn(jit_model, jit_submodule, "model.") == ao_utils.module_to_fqn(
            eager, eager.get_submodule(name), "model.")
        # The operator itself, on the C++ objects.
        assert torch.ops.sparsity.module_to_fqn(jit_model._c, jit_submodule._c, "p") == (
            ao_utils.module_to_fqn(eager, eager.get_submodule(name), "p"))


def test_module_to_fqn_module_not_in_model(vision_pair):
    eager, jit_model = vision_pair
    stranger = torch.jit.script(nn.Linear(1, 1))
    assert ao_utils.module_to_fqn(eager, nn.Linear(1, 1)) is None
    assert utils.module_to_fqn(jit_model, stranger) is None
    # A descendant does not contain its ancestor.
    first_child_name = next(iter(dict(jit_model.named_children())))
    first_child = submodule(jit_model, first_child_name)
    assert ao_utils.module_to_fqn(eager.get_submodule(first_child_name), eager) is None
    assert utils.module_to_fqn(first_child, jit_model) is None


def test_module_to_fqn_compares_identity_and_takes_first_path():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

        def forward(self, x):
            return self.b(self.a(x))

    model = torch.jit.script(Pair())
    # Same type and values, other object: not found.
    twin = torch.jit.script(Pair()).a
    assert utils.module_to_fqn(model, twin) is None
    # Share one module under two names: the first path wins, as in PyTorch.
    utils.set_submodule(model, "b", model.a)
    assert utils.module_to_fqn(model, model.b) == "a"
    eager = Pair()
    eager.b = eager.a
    assert ao_utils.module_to_fqn(eager, eager.b) == "a"


# ---------------------------------------------------------------- fqn_to_module


def test_fqn_to_module_every_submodule_parameter_buffer(vision_pair):
    eager, jit_model = vision_pair
    assert utils.fqn_to_module(jit_model, "") is jit_model
    for name, jit_submodule in jit_model.named_modules():
        assert ao_utils.fqn_to_module(eager, name) is not None
        found = utils.fqn_to_module(jit_model, name)
        assert isinstance(found, torch.jit.ScriptModule), name
        assert same_object(found, jit_submodule), name
        assert found is jit_submodule, name  # the model's own wrapper, as in PyTorch
        assert torch.ops.sparsity.fqn_to_module(jit_model._c, name) == jit_submodule._c
    tensors = dict(jit_model.named_parameters())
    tensors.update(jit_model.named_buffers())
    assert len(tensors) > 20
    for name, tensor in tensors.items():
        assert isinstance(ao_utils.fqn_to_module(eager, name), torch.Tensor)
        assert utils.fqn_to_module(jit_model, name) is tensor, name


def malformed_paths(model):
    first_child = next(iter(dict(model.named_children())))
    first_tensor = next(iter(dict(model.named_parameters())))
    return [
        ".", "..", "nope", f"{first_child}.", f".{first_child}", f"{first_child}..x",
        f"{first_child}.nope", f"{first_tensor}.x", f"{first_tensor}.x.y", "training.x",
        "a" * 100_000, ".".join([first_child] * 10_000), "слой.😀", "\u00e9\u0301", "\x00", " ",
    ]


def test_fqn_to_module_malformed_paths_give_none(vision_pair):
    eager, jit_model = vision_pair
    for path in malformed_paths(eager):
        assert ao_utils.fqn_to_module(eager, path) is None, path[:50]
        assert utils.fqn_to_module(jit_model, path) is None, path[:50]
        assert torch.ops.sparsity.fqn_to_module(jit_model._c, path) is None


def test_fqn_to_module_none_model_and_attributes():
    assert utils.fqn_to_module(None, "") is None
    assert utils.fqn_to_module(None, "a.b") is None
    assert ao_utils.fqn_to_module(None, "a.b") is None
    masked = torch.jit.script(MaskedLinear(nn.Linear(3, 2), torch.ones(2, 3)))
    assert utils.fqn_to_module(masked, "training") is True
    sparsity = utils.fqn_to_module(masked, "weight_sparsity")
    assert isinstance(sparsity, torch.ScriptObject)
    # A property of a custom class counts as an attribute.
    assert utils.fqn_to_module(masked, "weight_sparsity.mask") is sparsity.mask
    assert utils.fqn_to_module(masked, "weight_sparsity.nope") is None


def test_fqn_to_module_bad_model():
    with pytest.raises(RuntimeError, match=r"argument 'model' must be a module.*Tensor"):
        utils.fqn_to_module(torch.ones(2), "a")
    with pytest.raises(RuntimeError, match=r"argument 'model' must be a module.*int"):
        torch.ops.sparsity.fqn_to_module(3, "")


# ---------------------------------------------------------------- get_arg_info_from_tensor_fqn


def test_get_arg_info_from_tensor_fqn(vision_pair):
    eager, jit_model = vision_pair
    names = [n for n, _ in eager.named_parameters()] + [n for n, _ in eager.named_buffers()]
    names += ["weight", "", ".", "x.", ".x", "nope.weight", "a..b"] + malformed_paths(eager)
    for tensor_fqn in names:
        expected = ao_utils.get_arg_info_from_tensor_fqn(eager, tensor_fqn)
        got = utils.get_arg_info_from_tensor_fqn(jit_model, tensor_fqn)
        assert set(got) == set(expected)
        for key in ("module_fqn", "tensor_name", "tensor_fqn"):
            assert got[key] == expected[key], (tensor_fqn[:50], key)
        if expected["module"] is None:
            assert got["module"] is None
        elif isinstance(expected["module"], nn.Module):
            assert same_object(got["module"], submodule(jit_model, expected["module_fqn"]))
        elif isinstance(expected["module"], torch.Tensor):  # "<tensor>.x"
            assert got["module"] is submodule(jit_model, expected["module_fqn"])
        else:  # "training.x"
            assert got["module"] == expected["module"]


def test_get_arg_info_op_returns_the_module():
    model = torch.jit.script(ConvertibleNet())
    info = torch.ops.sparsity.get_arg_info_from_tensor_fqn(model._c, "head.fc.weight")
    assert info["module_fqn"] == "head.fc" and info["tensor_name"] == "weight"
    # Inside a dict the module reaches Python as a plain ScriptObject of the module's type.
    assert info["module"]._type() == model.head.fc._c._type()


# ---------------------------------------------------------------- module_contains_param


def test_module_contains_param_traced_parametrize_layout(pruned_pair):
    eager, traced = pruned_pair
    found = 0
    for name, eager_module in eager.named_modules():
        expected = ao_utils.module_contains_param(eager_module, ao_utils.FakeSparsity)
        traced_module = submodule(traced, name)
        assert utils.module_contains_param(traced_module, ao_utils.FakeSparsity) == expected, name
        assert utils.module_contains_param(traced_module, "FakeSparsity") == expected, name
        assert utils.module_contains_param(
            traced_module, "torch.ao.pruning.sparsifier.utils.FakeSparsity") == expected, name
        assert not utils.module_contains_param(traced_module, "Sparsity"), name
        assert not utils.module_contains_param(traced_module, "WeightNorm"), name
        found += expected
    assert found >= 4


def test_module_contains_param_fakesparsity_objects():
    model = torch.jit.script(ConvertibleNet())
    assert utils.module_contains_param(model.fc1, "FakeSparsity")
    assert utils.module_contains_param(model.head.fc, "FakeSparsity")
    assert utils.module_contains_param(model.fc1, "sparsity.FakeSparsity")
    assert not utils.module_contains_param(model.fc2, "FakeSparsity")
    # Only the module's own tensors count, not its children's (as in PyTorch).
    assert not utils.module_contains_param(model.head, "FakeSparsity")
    assert not utils.module_contains_param(model, "FakeSparsity")
    assert not utils.module_contains_param(model.fc1, "")


def test_module_contains_param_bad_input():
    with pytest.raises(RuntimeError, match=r"argument 'module' must be a module.*None"):
        utils.module_contains_param(None, "FakeSparsity")
    with pytest.raises(TypeError, match="pass its name"):
        utils.module_contains_param(torch.jit.script(nn.ReLU()), torch.classes.sparsity.FakeSparsity)
