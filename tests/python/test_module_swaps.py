"""The module utilities that change a model (swap_module, set_submodule,
the convert flow) against torch.ao.pruning.sparsifier.utils, and every
module operator called inside scripted methods."""

import io
import re
from typing import Any, Tuple

import pytest
import torch
from torch import nn
from torch.ao.pruning.sparsifier import utils as ao_utils

from end_to_end_models import example_input, pruned_eager_model
from module_utils_models import (
    ConvertibleNet,
    MaskedLinear,
    SparseLinear,
    masked_linear_reference,
    same_object,
    submodule,
)
from sparsity_pytest import needs_cuda
from torch_sparsity import utils

# torch.jit.script/trace/interface warn that they are deprecated.
# Tracing torch.ao.pruning's FakeSparsity warns about its shape check.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

DEVICES_MESSAGE = re.compile(
    r"^swap_module only works with cpu or single-device CUDA modules, but got devices \{(.*)\}$"
)


# ---------------------------------------------------------------- swap_module


def all_tensors(module):
    return list(module.parameters()) + list(module.buffers())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_swap_module_without_mapping_entry_returns_mod(arch):
    traced = torch.jit.trace(pruned_eager_model(arch), example_input())
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
