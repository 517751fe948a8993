"""Converted models follow .half(), .bfloat16(), .float(), .double() and
.to(dtype) as the pruned eager model does, on both targets, eager, scripted
and loaded from a TorchScript file, with every kind of mask: floating masks
take the new dtype (keeping their identity), bool masks stay bool."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.pruner import FakeStructuredSparsity
from torch.nn.utils import parametrize, prune

import torch_sparsity
from end_to_end_models import small_pruned_model
from sparsity_testing import assert_bitwise_equal
from torch_sparsity.convert import convert
from torch_sparsity.sparsifiers import prepare_with_masks

FakeSparsity = torch.classes.sparsity.FakeSparsity


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 6)
    ).eval()


def _masks(values):
    """Masks for the conv and linear weights and the linear bias, made by
    `values(shape)`."""
    shapes = {"0.weight": (4, 3, 3, 3), "4.weight": (6, 144), "4.bias": (6,)}
    return {name: values(shape) for name, shape in shapes.items()}


def _ao(values):
    return lambda: prepare_with_masks(_net(), _masks(values))


def _float_rows():
    model = _net()
    rows = torch.tensor([1.0, 0.0, 0.3, 1.7, 1.0, 0.0])
    parametrize.register_parametrization(model[4], "weight", FakeStructuredSparsity(rows))
    return model


def _nn_utils_prune():
    model = _net()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.custom_from_mask(model[4], "weight", mask=torch.rand(6, 144) > 0.5)
    return model


def _zeros_and_ones(shape):
    return (torch.rand(shape) > 0.5).float()


def _scaling(shape):
    return torch.rand(shape) * 2 * (torch.rand(shape) > 0.3)


# name: (pruned eager model, convert's keyword arguments, whether its masks stay bool once converted)
SOURCES = {
    "ao_bool_compact": (_ao(_zeros_and_ones), {}, True),
    "ao_floating": (_ao(_zeros_and_ones), {"compact_masks": False}, False),
    "ao_inplace": (_ao(_zeros_and_ones), {"inplace": True}, False),
    "ao_scaling": (_ao(_scaling), {}, False),
    "ao_structured_rows": (lambda: small_pruned_model("structured").eval(), {}, True),
    "ao_floating_rows": (_float_rows, {}, False),
    "nn_utils_prune": (_nn_utils_prune, {}, True),
    "nn_utils_prune_inplace": (_nn_utils_prune, {"inplace": True}, False),
}

# name: dtype steps; a forward runs after each, on eager and converted alike.
CHANGES = {
    "half": [torch.float16],
    "bfloat16": [torch.bfloat16],
    "double": [torch.float64],
    "half_then_float": [torch.float16, torch.float32],
    "bfloat16_then_double": [torch.bfloat16, torch.float64],
}

CONVERSIONS = {
    torch.float16: lambda m: m.half(),
    torch.bfloat16: lambda m: m.to(torch.bfloat16),  # ScriptModule refuses .bfloat16()
    torch.float32: lambda m: m.float(),
    torch.float64: lambda m: m.to(torch.float64),
}


def _input():
    return torch.randn(2, 3, 6, 6)  # for _net and small_pruned_model alike


def _made(make):
    # The same weights and masks at each call (prune's hooks keep deepcopy out).
    torch.manual_seed(0)
    return make()


def _forms(make, kwargs, target):
    """(name, converted model) for each form of the converted model: eager,
    scripted and loaded from a TorchScript file ("torchscript"); eager
    ("export")."""
    def converted():
        return convert(_made(make), target=target, **kwargs)

    yield "eager", converted()
    if target == "export":
        return
    yield "scripted", torch.jit.script(converted())
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(converted()), buffer)
    buffer.seek(0)
    yield "loaded", torch.jit.load(buffer)


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("target", ["torchscript", "export"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_converted_model_follows_dtype_changes_as_eager(source, target, change):
    make, kwargs, bool_masks = SOURCES[source]
    x = _input()
    for form, converted in _forms(make, kwargs, target):
        held = torch_sparsity.masks(converted)
        reference = _made(make)
        for step, dtype in enumerate(CHANGES[change]):
            what = f"{form} after {change} step {step}"
            with torch.no_grad():
                expected = CONVERSIONS[dtype](reference)(x.to(dtype))
                got = CONVERSIONS[dtype](converted)(x.to(dtype))
            assert_bitwise_equal(got, expected, what)
            for fqn, mask in torch_sparsity.masks(converted).items():
                assert mask.dtype == (torch.bool if bool_masks else dtype), f"{what}: {fqn}"
                if target == "torchscript":
                    assert mask is held[fqn], f"{what}: {fqn} keeps its identity"


def test_eager_masks_convert_with_the_module_before_any_forward():
    model = convert(_ao(_scaling)(), compact_masks=False)
    bool_model = convert(_ao(_zeros_and_ones)())
    model.half()
    bool_model.to(torch.float64)
    assert {m.dtype for m in torch_sparsity.masks(model).values()} == {torch.float16}
    assert {m.dtype for m in torch_sparsity.masks(bool_model).values()} == {torch.bool}


def test_inplace_conversion_keeps_the_sparsifier_mask_in_step():
    model = _ao(_zeros_and_ones)()
    sparsifier_mask = model[0].parametrizations.weight[0].mask
    convert(model, inplace=True)
    model.bfloat16()
    assert model[0].weight_sparsity.mask is sparsifier_mask
    assert sparsifier_mask.dtype == torch.bfloat16


def test_to_device_and_dtype(device):
    eager = _ao(_scaling)()
    x = _input()
    reference = copy.deepcopy(eager)
    with torch.no_grad():
        expected_there = reference.to(device, torch.float16)(x.to(device, torch.float16))
        expected_back = reference.to("cpu", torch.float32)(x)
    for model in [convert(eager), torch.jit.script(convert(eager)), convert(eager, target="export")]:
        with torch.no_grad():
            there = model.to(device, torch.float16)(x.to(device, torch.float16))
            back = model.to("cpu", torch.float32)(x)
        assert_bitwise_equal(there, expected_there, f"{type(model).__name__} on {device}, float16")
        assert_bitwise_equal(back, expected_back, f"{type(model).__name__} back on the CPU, float32")


def test_scripted_model_converted_as_cpp_does():
    # C++'s Module::to(dtype) swaps the data of each parameter and buffer
    # (set_data), as `.data =` does here; the masks follow at the forward.
    eager = _made(SOURCES["ao_scaling"][0])
    loaded = next(m for form, m in _forms(SOURCES["ao_scaling"][0], {}, "torchscript") if form == "loaded")
    for tensor in list(loaded.parameters()) + list(loaded.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.half()
    x = _input().half()
    with torch.no_grad():
        assert_bitwise_equal(loaded(x), eager.half()(x))


def test_follow_dtype():
    mask = torch.tensor([0.0, 0.3, 1.0])
    fs = FakeSparsity(mask)
    fs.follow_dtype(torch.ones(3, dtype=torch.int64))  # not floating: nothing to follow
    assert mask.dtype == torch.float32
    fs.follow_dtype(torch.ones(3, dtype=torch.float16))
    assert fs.mask is mask and mask.dtype == torch.float16
    assert torch.equal(mask, torch.tensor([0.0, 0.3, 1.0]).half())
    for dtype in (torch.bool, torch.uint8):
        kept = torch.tensor([1, 0, 1], dtype=dtype)
        FakeSparsity(kept).follow_dtype(torch.ones(3, dtype=torch.float16))
        assert kept.dtype == dtype


def test_forward_alone_keeps_type_promotion():
    # Only the getters of scripted converted modules follow: forward stays mask * x.
    mask = torch.tensor([0.5, 1.0])
    fs = FakeSparsity(mask)
    assert fs.forward(torch.ones(2, dtype=torch.float16)).dtype == torch.float32
    assert mask.dtype == torch.float32


def test_scripted_mask_follows_at_the_next_forward():
    # Nothing reaches a scripted module's masks on .half(): its getters
    # convert them when they run, so .half().float() with no forward between
    # leaves the masks their float32 values (eager rounds them through float16).
    scripted = torch.jit.script(convert(_ao(_scaling)()))
    before = {fqn: mask.clone() for fqn, mask in torch_sparsity.masks(scripted).items()}
    scripted.half()
    assert {mask.dtype for mask in torch_sparsity.masks(scripted).values()} == {torch.float32}
    with torch.no_grad():
        scripted.float()(_input())
    for fqn, mask in torch_sparsity.masks(scripted).items():
        assert_bitwise_equal(mask, before[fqn], fqn)
