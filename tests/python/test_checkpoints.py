"""load_state_dict of a converted model (both targets, eager) takes the
state dict of the pruned eager model, strict or not: the eager model is
fine-tuned (weights and masks changed), its state dict saved and loaded into
a model converted from another pruned model of the same architecture, which
then equals the fine-tuned eager model converted: outputs, masks (values,
dtype) and state dict, bit for bit. Every pruning source; the converted
model's own state dict; the errors, which leave the module's masks alone."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.pruner import FakeStructuredSparsity
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize, prune

import torch_sparsity
from end_to_end_models import CONV, FC1, FC2, net, prune_net
from sparsity_testing import assert_bitwise_equal
from torch_sparsity.convert import convert, squash
from torch_sparsity.sparsifiers import prepare_with_masks

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),  # bit for bit (conftest.py)
]

TARGETS = ["torchscript", "export"]
# torch.ao.pruning's own parametrizations keep their masks out of state dicts.
MASKS_IN_STATE_DICT = ["ao_mask_in_state_dict", "nn_utils_prune"]
SOURCES = ["ao_unstructured", "ao_structured_prune_bias", "ao_structured_keep_bias"] + MASKS_IN_STATE_DICT

class MaskInStateDict(FakeSparsity):
    """A FakeSparsity that keeps its mask in the state dict, as
    ``parametrizations.weight.0.mask``."""

    state_dict = nn.Module.state_dict


class RowMaskInStateDict(FakeStructuredSparsity):
    """A FakeStructuredSparsity that keeps its row mask in the state dict."""

    state_dict = nn.Module.state_dict


def pruned(source, seed, device):
    """net() pruned by ``source``; ``seed`` picks its weights and masks."""
    torch.manual_seed(seed)
    model = net().to(device)
    if source != "ao_mask_in_state_dict":
        return prune_net(model, source)
    for index in (CONV, FC1, FC2):
        weight = model[index].weight
        parametrize.register_parametrization(
            model[index], "weight", MaskInStateDict((torch.rand_like(weight) > 0.5).float()))
    return model


def eager_masks(model):
    """The eager model's masks by tensor fqn, read from the toolkits' own
    places: the parametrization's mask, prune's ``T_mask``."""
    found = {}
    for fqn, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name, parametrizations in module.parametrizations.items():
                found[f"{fqn}.{name}"] = parametrizations[0].mask
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                found[f"{fqn}.{hook._tensor_name}"] = getattr(module, hook._tensor_name + "_mask")
    return found


def run(model, x):
    with torch.no_grad():
        return model(x)


def saved(state_dict):
    """The state dict through torch.save and torch.load, onto the CPU."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu")


def case(source, target, device):
    """(the fine-tuned eager model, its saved state dict, a model converted
    from another pruned model, an input)."""
    x = torch.randn(2, 3, 6, 6, device=device)
    converted = convert(pruned(source, 1, device), target=target)
    eager = pruned(source, 0, device)
    with torch.no_grad():
        for parameter in eager.parameters():
            parameter.add_(torch.randn_like(parameter))
        for fqn, mask in eager_masks(eager).items():
            if source in MASKS_IN_STATE_DICT:
                mask.copy_(torch.rand(mask.shape, device=device) > 0.4)
            else:  # nothing to load them from: the converted model keeps its own
                mask.copy_(torch_sparsity.masks(converted)[fqn])
        if source == "nn_utils_prune":
            eager[FC1].bias_mask[0] = 0.5  # not a 0/1 mask: convert keeps it float32
    run(eager, x)  # BiasHook zeroes the pruned rows of _bias, as fine-tuning's forwards do
    return eager, saved(eager.state_dict()), converted, x


def assert_same_masks(actual, expected):
    assert sorted(actual) == sorted(expected)
    for fqn, mask in expected.items():
        assert_bitwise_equal(actual[fqn], mask, fqn)


def assert_same_state(actual, expected):
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        assert_bitwise_equal(actual[key], tensor, key)


def masks_snapshot(model):
    return {fqn: (mask.data_ptr(), mask.clone()) for fqn, mask in torch_sparsity.masks(model).items()}


def assert_masks_unchanged(model, snapshot, fqns):
    held = torch_sparsity.masks(model)
    for fqn in fqns:
        data_ptr, mask = snapshot[fqn]
        assert held[fqn].data_ptr() == data_ptr, fqn
        assert_bitwise_equal(held[fqn], mask, fqn)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("target", TARGETS)
def test_loads_the_pruned_eager_models_checkpoint(target, source, strict, device):
    eager, state, converted, x = case(source, target, device)
    if source == "ao_mask_in_state_dict":
        assert "0.parametrizations.weight.0.mask" in state
    before = masks_snapshot(converted)
    with torch.inference_mode():
        converted(x)  # fills FakeSparsity's inference cache, which the load must not leave stale
    result = converted.load_state_dict(state, strict=strict)
    assert result.missing_keys == [] and result.unexpected_keys == []
    expected = convert(eager, target=target)
    assert_same_masks(torch_sparsity.masks(converted), torch_sparsity.masks(expected))
    assert_same_state(converted.state_dict(), expected.state_dict())
    assert_bitwise_equal(run(converted, x), run(eager, x))
    # A mask that keeps its dtype is loaded in place: the live tensor stays.
    kept = [fqn for fqn, mask in torch_sparsity.masks(converted).items() if mask.dtype == before[fqn][1].dtype]
    assert kept
    for fqn in kept:
        assert torch_sparsity.masks(converted)[fqn].data_ptr() == before[fqn][0], fqn
    if target == "torchscript":
        assert_bitwise_equal(run(torch.jit.script(converted), x), run(eager, x))


@pytest.mark.parametrize("target", TARGETS)
def test_a_mask_that_is_not_0_or_1_replaces_a_bool_one(target):
    eager, state, converted, x = case("nn_utils_prune", target, "cpu")
    assert torch_sparsity.masks(converted)["3.bias"].dtype == torch.bool
    converted.load_state_dict(state)
    assert torch_sparsity.masks(converted)["3.bias"].dtype == torch.float32
    assert_bitwise_equal(run(converted, x), run(eager, x))
    torch_sparsity.masks(converted)["3.bias"].zero_()  # the new mask is live
    assert not torch.equal(run(converted, x), run(eager, x))


@pytest.mark.parametrize("target", TARGETS)
def test_a_row_mask_that_is_not_0_or_1_replaces_a_bool_one(target):
    def row_pruned(mask):
        torch.manual_seed(0)
        model = net()
        parametrize.register_parametrization(model[FC1], "weight", RowMaskInStateDict(mask))
        return model

    x = torch.randn(2, 3, 6, 6)
    converted = convert(row_pruned(torch.rand(6) > 0.5), target=target)
    eager = row_pruned(torch.tensor([0.5, 1, 0, 1, 0, 1]))
    converted.load_state_dict(saved(eager.state_dict()))
    assert_same_masks(torch_sparsity.masks(converted), {"3.weight": torch.tensor([0.5, 1, 0, 1, 0, 1])})
    assert_bitwise_equal(run(converted, x), run(eager, x))
    if target == "torchscript":
        assert_bitwise_equal(run(torch.jit.script(converted), x), run(eager, x))


@pytest.mark.parametrize("source", MASKS_IN_STATE_DICT)
@pytest.mark.parametrize("target", TARGETS)
def test_assign_takes_the_checkpoints_masks(target, source):
    eager, state, converted, x = case(source, target, "cpu")
    converted.load_state_dict(state, assign=True)
    expected = convert(eager, target=target)
    assert_same_masks(torch_sparsity.masks(converted), torch_sparsity.masks(expected))
    assert_bitwise_equal(run(converted, x), run(eager, x))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("target", TARGETS)
def test_round_trip_of_the_converted_models_own_state_dict(target, source):
    _, _, converted, x = case(source, target, "cpu")
    other = convert(pruned(source, 2, "cpu"), target=target)
    before = masks_snapshot(other)
    other.load_state_dict(saved(converted.state_dict()))
    assert_same_state(other.state_dict(), converted.state_dict())
    assert_masks_unchanged(other, before, before)  # the converted state dict holds no masks
    with torch.no_grad():
        for fqn, mask in torch_sparsity.masks(other).items():
            mask.copy_(torch_sparsity.masks(converted)[fqn])
    assert_bitwise_equal(run(other, x), run(converted, x))


class LinearWithWeightMask(nn.Linear):
    """A Linear whose own persistent buffer is named like prune's mask."""

    def __init__(self):
        super().__init__(4, 3)
        self.register_buffer("weight_mask", torch.zeros(3, 4))


def test_a_buffer_of_the_module_named_like_prunes_mask_stays_its_own():
    model = LinearWithWeightMask()
    prepare_with_masks(model, {"weight": torch.rand(3, 4) > 0.5})
    converted = convert(model)
    mask = converted.weight_sparsity.mask.clone()
    state = converted.state_dict()
    state["weight_mask"] = torch.ones(3, 4)
    converted.load_state_dict(state)
    assert torch.equal(converted.weight_mask, torch.ones(3, 4))
    assert_bitwise_equal(converted.weight_sparsity.mask, mask)


@pytest.mark.parametrize("way", ["pickle", "deepcopy"])
@pytest.mark.parametrize("target", TARGETS)
def test_a_copied_model_loads_into_itself(target, way):
    eager, state, converted, x = case("nn_utils_prune", target, "cpu")
    copied = pickle.loads(pickle.dumps(converted)) if way == "pickle" else copy.deepcopy(converted)
    before = masks_snapshot(converted)
    copied.load_state_dict(state)
    assert_bitwise_equal(run(copied, x), run(eager, x))
    assert_masks_unchanged(converted, before, before)  # the model copied is not the one loaded


@pytest.mark.parametrize("target", TARGETS)
def test_a_mask_of_the_wrong_shape_changes_no_mask_of_its_module(target):
    _, state, converted, _ = case("nn_utils_prune", target, "cpu")
    state["3.bias_mask"] = torch.ones(5)
    before = masks_snapshot(converted)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"size mismatch for 3.bias_mask: copying a mask with shape \(5,\) "
                                               r"from checkpoint, the mask in current model has shape \(6,\)"):
            converted.load_state_dict(state, strict=strict)
        assert_masks_unchanged(converted, before, ["3.weight", "3.bias"])


@pytest.mark.parametrize("target", TARGETS)
def test_a_mask_the_plugin_refuses_changes_no_mask_of_its_module(target):
    _, state, converted, _ = case("ao_mask_in_state_dict", target, "cpu")
    state["0.parametrizations.weight.0.mask"] = torch.full((8, 3, 3, 3), 2, dtype=torch.int64)
    before = masks_snapshot(converted)
    with pytest.raises(RuntimeError, match=r"the mask under 0.parametrizations.weight.0.mask is refused"):
        converted.load_state_dict(state)
    assert_masks_unchanged(converted, before, ["0.weight"])


@pytest.mark.parametrize("target", TARGETS)
def test_a_missing_key_is_named_by_its_converted_name(target):
    _, state, converted, _ = case("nn_utils_prune", target, "cpu")
    del state["0.weight_orig"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0.weight_original"'):
        converted.load_state_dict(state)
    result = converted.load_state_dict(state, strict=False)
    assert result.missing_keys == ["0.weight_original"] and result.unexpected_keys == []


@pytest.mark.parametrize("target", TARGETS)
def test_a_squashed_model_takes_only_its_own_names(target):
    # Squashed, T_original holds mask * weight: prune's T_orig must not land there.
    _, state, converted, _ = case("nn_utils_prune", target, "cpu")
    squash(converted)
    result = converted.load_state_dict(state, strict=False)
    assert "0.weight_original" in result.missing_keys
    assert {"0.weight_orig", "0.weight_mask"} <= set(result.unexpected_keys)
    converted.load_state_dict(converted.state_dict())
