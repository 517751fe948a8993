"""Whole converted models (both targets, eager) pickled, saved with
torch.save and deep-copied: the copy computes the same outputs bit for bit,
its masks keep their dtypes and values and stay live, it still scripts or
exports, and pickling leaves the model it copies alone. Models pruned by
torch.ao.pruning (unstructured and structured, with and without prune_bias)
and by torch.nn.utils.prune."""

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import torch_sparsity
from end_to_end_models import NET_SOURCES, net, prune_net
from torch_sparsity.convert import convert, squash

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),  # bit-for-bit gradients (conftest.py)
]

TARGETS = ["torchscript", "export"]
SOURCES = NET_SOURCES
WAYS = ["pickle", "torch_save", "deepcopy"]


def pruned(source):
    """net() pruned by ``source``, and an input."""
    torch.manual_seed(0)
    return prune_net(net().eval(), source), torch.randn(2, 3, 6, 6)


def converted(target, source, **options):
    model, x = pruned(source)
    return convert(model, target=target, **options), x


def round_trip(model, way):
    if way == "pickle":
        return pickle.loads(pickle.dumps(model))
    if way == "torch_save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    return copy.deepcopy(model)


def run(model, x):
    with torch.no_grad():
        return model(x)


def assert_same_masks(actual, expected):
    assert sorted(actual) == sorted(expected)
    for fqn, mask in expected.items():
        assert actual[fqn].dtype == mask.dtype, fqn
        assert torch.equal(actual[fqn], mask), fqn


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("target", TARGETS)
def test_round_trip_keeps_outputs_and_masks(target, source, way):
    model, x = converted(target, source)
    loaded = round_trip(model, way)
    assert torch.equal(run(loaded, x), run(model, x))
    assert_same_masks(torch_sparsity.masks(loaded), torch_sparsity.masks(model))
    for (name, module), (_, copied) in zip(model.named_modules(), loaded.named_modules()):
        assert type(copied) is type(module), name  # the same generated class
    for (name, tensor), (copied_name, copied) in zip(model.named_parameters(), loaded.named_parameters()):
        assert copied_name == name and isinstance(copied, nn.Parameter) and torch.equal(copied, tensor)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("target", TARGETS)
def test_loaded_masks_are_live_and_their_own(target, source, way):
    model, x = converted(target, source)
    before = run(model, x)
    loaded = round_trip(model, way)
    loaded_masks = torch_sparsity.masks(loaded)
    for mask in loaded_masks.values():
        mask.zero_()  # prunes everything
    after = run(loaded, x)
    assert not torch.equal(after, before)
    assert torch.equal(run(model, x), before)  # the model copied keeps its masks
    for fqn, mask in torch_sparsity.masks(model).items():
        mask.zero_()  # prunes everything
    assert torch.equal(run(model, x), after)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("target", TARGETS)
def test_loaded_model_trains_like_the_model(target, source, way):
    model, x = converted(target, source)
    loaded = round_trip(model, way)
    model.train()
    loaded.train()
    model(x).square().sum().backward()
    loaded(x).square().sum().backward()
    for (name, tensor), (_, copied) in zip(model.named_parameters(), loaded.named_parameters()):
        if tensor.grad is None:  # a structured pruner's _bias: BiasHook adds it detached
            assert copied.grad is None, name
        else:
            assert torch.equal(copied.grad, tensor.grad), name


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("source", SOURCES)
def test_loaded_torchscript_target_scripts(source, way):
    model, x = converted("torchscript", source)
    loaded = round_trip(model, way)
    scripted = torch.jit.script(loaded)
    assert torch.equal(run(scripted, x), run(model, x))
    assert_same_masks(torch_sparsity.masks(scripted), torch_sparsity.masks(model))
    for mask in torch_sparsity.masks(scripted).values():
        mask.zero_()  # prunes everything
    assert torch.equal(run(scripted, x), run(loaded, x))  # scripted and eager share the objects


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("source", SOURCES)
def test_loaded_export_target_exports(source, way):
    model, x = converted("export", source)
    loaded = round_trip(model, way)
    program = torch.export.export(loaded, (x,))
    assert torch.equal(program.module()(x), run(model, x))
    assert_same_masks(torch_sparsity.masks(program), torch_sparsity.masks(model))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("target", TARGETS)
def test_pickling_leaves_the_model_alone(target, source):
    model, x = converted(target, source)
    expected = run(model, x)
    masks = torch_sparsity.masks(model)
    saved = {fqn: mask.clone() for fqn, mask in masks.items()}
    classes = [type(module) for module in model.modules()]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pickle.dumps(model)
    torch.save(model, io.BytesIO())
    assert [type(module) for module in model.modules()] == classes
    after = torch_sparsity.masks(model)
    assert all(after[fqn] is mask for fqn, mask in masks.items())  # the very tensors
    assert_same_masks(after, saved)
    assert sorted(model.state_dict()) == sorted(state)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())
    assert torch.equal(run(model, x), expected)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("target", TARGETS)
def test_inplace_converted_model_round_trips(target, source):
    model, x = converted(target, source, inplace=True)
    loaded = round_trip(model, "torch_save")
    assert torch.equal(run(loaded, x), run(model, x))
    assert_same_masks(torch_sparsity.masks(loaded), torch_sparsity.masks(model))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("target", TARGETS)
def test_squashed_model_round_trips(target, source):
    model, x = converted(target, source)
    squash(model)
    loaded = round_trip(model, "pickle")
    assert torch.equal(run(loaded, x), run(model, x))
    assert torch_sparsity.masks(loaded) == {}


# Unpickling imports torch_sparsity itself (the library, the classes).
FRESH_PROCESS = """
import sys
import torch
saved = torch.load(sys.argv[1], weights_only=False)
model, x, expected = saved["model"], saved["x"], saved["masks"]
import torch_sparsity
with torch.no_grad():
    assert torch.equal(model(x), saved["y"]), "output"
masks = torch_sparsity.masks(model)
assert sorted(masks) == sorted(expected), (sorted(masks), sorted(expected))
for fqn, mask in masks.items():
    assert mask.dtype == expected[fqn].dtype and torch.equal(mask, expected[fqn]), fqn
    mask.zero_()
with torch.no_grad():
    assert not torch.equal(model(x), saved["y"]), "masks not live"
print("loaded")
"""


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("target", TARGETS)
def test_saved_model_loads_in_another_process(target, source, tmp_path):
    model, x = converted(target, source)
    masks = {fqn: mask.clone() for fqn, mask in torch_sparsity.masks(model).items()}
    torch.save({"model": model, "x": x, "y": run(model, x), "masks": masks}, tmp_path / "model.pt")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "model.pt")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "loaded", result.stderr
