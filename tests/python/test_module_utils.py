"""The module utilities (torch.ops.sparsity.* and torch_sparsity.utils) against
torch.ao.pruning.sparsifier.utils, on scripted and traced torchvision models."""

import io
import re
from typing import Any, Tuple

import pytest
import torch
import torchvision
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.ao.pruning.sparsifier import utils as ao_utils

from sparsity_testing import needs_cuda
from torch_sparsity import utils

from module_utils_models import (
    ConvertibleNet,
    MaskedLinear,
    SparseLinear,
    masked_linear_reference,
)

# torch.jit.script/trace/interface warn that they are deprecated.
# Tracing torch.ao.pruning's FakeSparsity warns about its shape check.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

ARCHITECTURES = ["resnet18", "mobilenet_v3_small", "squeezenet1_0"]
DEVICES_MESSAGE = re.compile(
    r"^swap_module only works with cpu or single-device CUDA modules, but got devices \{(.*)\}$"
)


def same_object(a, b) -> bool:
    """Identity of the TorchScript objects behind two ScriptModule wrappers."""
    return a._c == b._c


def submodule(model, name):
    """model.get_submodule(name), which ScriptModules lack."""
    for piece in name.split(".") if name else []:
        model = getattr(model, piece)
    return model


def example_input():
    return torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module", params=[(a, k) for a in ARCHITECTURES for k in ("scripted", "traced")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def vision_pair(request):
    """(eager model, the same model scripted or traced)."""
    arch, kind = request.param
    torch.manual_seed(0)
    eager = getattr(torchvision.models, arch)(weights=None).eval()
    jit_model = torch.jit.script(eager) if kind == "scripted" else torch.jit.trace(eager, example_input())
    return eager, jit_model


def pruned_eager_model(arch):
    """A torchvision model prepared by WeightNormSparsifier: FakeSparsity
    parametrizations on its Linear weights and on a few conv weights."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)][:3]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = [{"tensor_fqn": f"{name}.weight"} for name in convs + linears]
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, config)
    # Real masks rather than all ones. (The sparsifier's step() pools 2-D
    # weights only, so conv masks are filled at random.)
    for group in sparsifier.groups:
        mask = group["module"].parametrizations[group["tensor_name"]][0].mask
        mask.copy_(torch.rand(mask.shape) > 0.5)
    return model


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


# ---------------------------------------------------------------- swap_module


def all_tensors(module):
    return list(module.parameters()) + list(module.buffers())


def test_swap_module_without_mapping_entry_returns_mod(pruned_pair):
    _, traced = pruned_pair
    prototype = torch.jit.script(SparseLinear())
    for name, module in traced.named_modules():
        if "Linear" in module.original_name:
            continue
        assert utils.swap_module(module, {"Linear": prototype}) is module
        assert torch.ops.sparsity.swap_module(module._c, {"Linear": prototype._c}) == module._c
    assert utils.swap_module(traced, {}) is traced


def test_swap_module_traced_parametrized_linear():
    eager = pruned_eager_model("resnet18")
    traced = torch.jit.trace(eager, example_input())
    prototype = torch.jit.script(SparseLinear())
    prototype_weight = prototype.weight.clone()
    assert ao_utils.type_before_parametrizations(eager.fc) is nn.Linear
    assert traced.fc._c._type().name() == "ParametrizedLinear"

    sparse = utils.swap_module(traced.fc, {nn.Linear: prototype})
    assert not same_object(sparse, traced.fc) and not same_object(sparse, prototype)
    assert sparse._c._type() == prototype._c._type()
    mask = eager.fc.parametrizations.weight[0].mask
    assert torch.equal(sparse.mask, mask)
    assert torch.equal(sparse.weight, eager.fc.weight.detach())  # eager's weight is masked
    assert torch.equal(sparse.bias, eager.fc.bias.detach())
    x = torch.randn(5, 512)
    torch.testing.assert_close(sparse(x), eager.fc(x))
    # The prototype is never changed.
    assert torch.equal(prototype.weight, prototype_weight)


# Where no GPU is, 'meta' stands in for another device.
@pytest.mark.parametrize("elsewhere", ["meta", pytest.param("cuda", marks=needs_cuda)])
def test_swap_module_puts_replacement_on_the_dense_device(elsewhere):
    class ScaledPrototype(SparseLinear):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(1))  # not set by from_dense

    prototype = torch.jit.script(ScaledPrototype())
    if elsewhere == "meta":
        dense = torch.jit.script(MaskedLinear(nn.Linear(4, 3, device="meta"), torch.ones(3, 4, device="meta")))
    else:
        dense = torch.jit.script(MaskedLinear(nn.Linear(4, 3), torch.ones(3, 4))).cuda()
    sparse = utils.swap_module(dense, {"MaskedLinear": prototype})
    expected = torch.device("meta") if elsewhere == "meta" else torch.device("cuda", 0)
    assert {t.device for t in all_tensors(sparse)} == {expected}
    assert {t.device for t in all_tensors(prototype)} == {torch.device("cpu")}


def two_device_linear():
    linear = nn.Linear(2, 2)
    linear.register_buffer("on_meta", torch.zeros(1, device="meta"))
    return linear


def device_set(message):
    match = DEVICES_MESSAGE.match(message)
    assert match, message
    return set(re.findall(r"device\([^)]*\)", match.group(1)))


def test_swap_module_several_devices():
    # torch.ao.pruning refuses it too (with an AssertionError); same message.
    class EagerSparse(nn.Linear):
        @classmethod
        def from_dense(cls, mod):
            return cls(mod.in_features, mod.out_features)

    with pytest.raises(AssertionError) as reference:
        ao_utils.swap_module(two_device_linear(), {nn.Linear: EagerSparse})

    class CountingPrototype(SparseLinear):
        def __init__(self):
            super().__init__()
            self.calls = 0

        @torch.jit.export
        def from_dense(self, dense: Any) -> None:
            self.calls += 1

    prototype = torch.jit.script(CountingPrototype())
    dense = torch.jit.script(two_device_linear())
    with pytest.raises(RuntimeError) as ours:
        utils.swap_module(dense, {"Linear": prototype})
    assert device_set(str(ours.value)) == device_set(str(reference.value)) == {
        "device(type='cpu')", "device(type='meta')"}
    assert prototype.calls == 0
    assert str(ours.value) == (
        "swap_module only works with cpu or single-device CUDA modules, "
        "but got devices {device(type='cpu'), device(type='meta')}")


def test_swap_module_hooks_left_behind_warn(capfd):
    def hook(module, inputs: Tuple[torch.Tensor], output: torch.Tensor):
        return output * 2

    linear = MaskedLinear(nn.Linear(2, 2), torch.ones(2, 2))
    linear.register_forward_hook(hook)
    dense = torch.jit.script(linear)
    assert len(dense._c._get_forward_hooks()) == 1
    sparse = utils.swap_module(dense, {"MaskedLinear": torch.jit.script(SparseLinear())})
    assert sparse._c._get_forward_hooks() == []
    # TORCH_WARN from a torch.ops call reaches C++'s log (stderr), not Python's warnings.
    assert "forward hooks of the dense module" in capfd.readouterr().err


def test_swap_module_bad_input():
    dense = torch.jit.script(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"mapping\['Linear'\] must be a prototype module.*Tensor"):
        utils.swap_module(dense, {"Linear": torch.ones(1)})
    with pytest.raises(RuntimeError, match="has no scripted method from_dense"):
        utils.swap_module(dense, {"Linear": torch.jit.script(nn.ReLU())})
    with pytest.raises(RuntimeError, match="argument 'mod' must be a module.*None"):
        utils.swap_module(None, {})

    class FailingPrototype(SparseLinear):
        @torch.jit.export
        def from_dense(self, dense: Any) -> None:
            self.weight = torch.zeros(1)
            raise RuntimeError("cannot convert this one")

    prototype = torch.jit.script(FailingPrototype())
    weight_before = dense.weight.clone()
    with pytest.raises(RuntimeError, match=r"(?s)from_dense of the prototype mapped to 'Linear'.*cannot convert this one"):
        utils.swap_module(dense, {"Linear": prototype})
    assert prototype.weight.numel() == 0 and torch.equal(dense.weight, weight_before)


# ---------------------------------------------------------------- set_submodule and convert


def test_set_submodule_interface_and_same_type():
    model = torch.jit.script(ConvertibleNet())
    x = torch.randn(2, 4)
    sparse = utils.swap_module(model.fc1, {"MaskedLinear": model.sparse_prototype})
    expected_fc1 = masked_linear_reference(model.fc1, x)
    utils.set_submodule(model, "fc1", sparse)  # interface-typed attribute
    assert model.fc1 is sparse and model._c.getattr("fc1") == sparse._c
    torch.testing.assert_close(model.fc1(x), expected_fc1)

    # Same-typed attribute: TorchScript gives modules of the same structure one
    # compiled type, so a separately scripted twin fits.
    twin = torch.jit.script(nn.Sequential(nn.ReLU(), nn.Linear(8, 6)))
    assert twin._c._type() == model.body._c._type()
    utils.set_submodule(model, "body", twin)
    assert model.body is twin
    torch.testing.assert_close(model.body(torch.ones(1, 8)), twin(torch.ones(1, 8)))
    other = torch.jit.script(nn.Sequential(nn.ReLU(), nn.Linear(8, 6), nn.ReLU()))
    with pytest.raises(RuntimeError, match="declared with the module type .*Sequential"):
        utils.set_submodule(model, "body", other)  # same class, other compiled type
    assert model.body is twin


def test_set_submodule_errors_leave_parent_unchanged():
    model = torch.jit.script(ConvertibleNet())
    before = {name: m._c for name, m in model.named_modules()}
    relu = torch.jit.script(nn.ReLU())
    with pytest.raises(RuntimeError, match=r"module interface .*LinearLike.*does not implement"):
        utils.set_submodule(model, "fc1", torch.jit.script(nn.Bilinear(2, 2, 2)))
    with pytest.raises(RuntimeError, match=r"declared with the module type .*Linear"):
        utils.set_submodule(model, "body.1", relu)
    with pytest.raises(RuntimeError, match="has no attribute 'nope'"):
        utils.set_submodule(model, "nope", relu)
    with pytest.raises(RuntimeError, match="'missing' does not name a submodule"):
        utils.set_submodule(model, "missing.fc", relu)
    with pytest.raises(RuntimeError, match="'fc1.weight' is an attribute of type Tensor, not a submodule"):
        utils.set_submodule(model, "fc1.weight", relu)
    with pytest.raises(RuntimeError, match="argument 'new_module' must be a module"):
        utils.set_submodule(model, "fc1", torch.ones(1))
    assert {name: m._c for name, m in model.named_modules()} == before


def test_set_submodule_into_traced_parent_fails_clearly():
    eager = pruned_eager_model("resnet18")
    traced = torch.jit.trace(eager, example_input())
    sparse = utils.swap_module(traced.fc, {"Linear": torch.jit.script(SparseLinear())})
    with pytest.raises(RuntimeError, match="declare the attribute with a module interface type"):
        utils.set_submodule(traced, "fc", sparse)


def test_convert_flow_in_python():
    torch.manual_seed(0)
    model = torch.jit.script(ConvertibleNet())
    x = torch.randn(3, 4)
    expected = model(x)
    mapping = {"MaskedLinear": model.sparse_prototype}
    swapped = []
    for name, module in list(model.named_modules()):
        if name and utils.module_contains_param(module, "FakeSparsity") and (
                module._c._type().name() in mapping):
            utils.set_submodule(model, name, utils.swap_module(module, mapping))
            swapped.append(name)
    assert swapped == ["fc1", "head.fc"]
    assert model.fc1.original_name == "SparseLinear" and model.head.fc.original_name == "SparseLinear"
    assert not any(utils.module_contains_param(m, "FakeSparsity") for _, m in model.named_modules())
    torch.testing.assert_close(model(x), expected)


# ---------------------------------------------------------------- every op inside TorchScript


def test_ops_inside_scripted_methods():
    torch.manual_seed(0)
    model = torch.jit.script(ConvertibleNet())
    assert model.fqn_of_head_fc("") == "head.fc"
    assert model.fqn_of_head_fc("net.") == "net.head.fc"
    assert model.fqn_of_prototype_in_body() is None
    assert same_object(utils.fqn_to_module(model, "body.1"), submodule(model.body, "1"))
    assert model.lookup("body..1") is None
    assert model.lookup_tensor("fc2.weight") is model.fc2.weight
    assert model.lookup_tensor("fc1.weight_sparsity.mask") is model.fc1.weight_sparsity.mask
    assert model.lookup_tensor("fc2.weight.x") is None
    info = model.tensor_info("head.fc.bias")
    assert (info["module_fqn"], info["tensor_name"], info["tensor_fqn"]) == ("head.fc", "bias", "head.fc.bias")
    assert info["module"]._type() == model.head.fc._c._type()
    assert model.has_fake_sparsity("fc1") and not model.has_fake_sparsity("fc2")
    swapped = model.swapped_fc1()
    assert swapped._type() == model.sparse_prototype._c._type()
    assert model.swapped_fc2() == model.fc2._c

    x = torch.randn(3, 4)
    expected = model(x)
    model.convert()
    assert model._c.getattr("fc1")._type() == model.sparse_prototype._c._type()
    assert not model.has_fake_sparsity("fc1") and not model.has_fake_sparsity("head.fc")
    torch.testing.assert_close(model(x), expected)
    # Saving and loading keeps the converted model.
    stream = io.BytesIO()
    torch.jit.save(model, stream)
    stream.seek(0)
    loaded = torch.jit.load(stream)
    torch.testing.assert_close(loaded(x), expected)


def test_ops_inside_scripted_methods_bad_input():
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        @torch.jit.export
        def fqn_of_none(self) -> bool:
            return torch.ops.sparsity.module_contains_param(None, "FakeSparsity")

    model = torch.jit.script(Bad())
    with pytest.raises(RuntimeError, match="argument 'module' must be a module"):
        model.fqn_of_none()
