"""What convert() refuses, for models pruned with torch.ao.pruning: each
refusal names the module, the tensor and why, before anything changed."""

import copy
import re

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.pruner import FakeStructuredSparsity
from torch.nn.utils import parametrize

from torch_sparsity.convert import ConversionError, convert
from torch_sparsity.sparsifiers import prepare_with_masks


class Double(nn.Module):
    def forward(self, x):
        return 2 * x


class ReadsWeightByName(nn.Module):
    """Fine in eager mode, but TorchScript needs literal attribute names."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        return x @ getattr(self, "wei" + "ght")


def halves_with_a_set(module, inputs):
    """Unscriptable: TorchScript has no sets."""
    return (inputs[0] / len({1, 2}),)


def doubles_with_a_set(module, inputs, output):
    return output * len({1, 2})


def _refusal_cases():
    def other_parametrization():
        model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3)))
        parametrize.register_parametrization(model[1][0], "weight", Double())
        return model, "module '1.0' (Linear): tensor 'weight' has the parametrizations ['Double']"

    def two_masks():
        model = nn.Sequential(nn.Linear(3, 3))
        prepare_with_masks(model, {"0.weight": torch.ones(3, 3)})
        prepare_with_masks(model, {"0.weight": torch.ones(3, 3)})
        return model, "module '0' (Linear): tensor 'weight' has the parametrizations ['FakeSparsity', 'FakeSparsity']"

    def structured_and_another():
        # (A structured pruner's parametrization alone converts:
        # test_structured_pruners.py.)
        model = nn.Sequential(nn.Conv2d(2, 4, 1))
        parametrize.register_parametrization(model[0], "weight", FakeStructuredSparsity(torch.ones(4, dtype=torch.bool)))
        parametrize.register_parametrization(model[0], "weight", Double())
        return model, "module '0' (Conv2d): tensor 'weight' has the parametrizations ['FakeStructuredSparsity', 'Double']"

    def integer_tensor():
        model = nn.Sequential(nn.BatchNorm1d(3))
        prepare_with_masks(model, {"0.num_batches_tracked": torch.ones((), dtype=torch.long)})
        return model, "module '0' (BatchNorm1d): tensor 'num_batches_tracked' has dtype torch.int64"

    def name_taken():
        model = nn.Sequential(nn.Linear(3, 3))
        model[0].weight_original = 1
        prepare_with_masks(model, {"0.weight": torch.ones(3, 3)})
        return model, "module '0' (Linear): cannot hold tensor 'weight' as 'weight_original'"

    def bad_mask_dtype():
        model = nn.Sequential(nn.Linear(3, 3))
        prepare_with_masks(model, {"0.weight": torch.ones(3, 3, dtype=torch.int32)})
        return model, "module '0' (Linear): the mask of tensor 'weight' is refused: FakeSparsity: mask must be bool, uint8 or floating"

    def recurrent():
        model = nn.Sequential(nn.LSTM(3, 3))
        prepare_with_masks(model, {"0.weight_hh_l0": torch.ones(12, 3)})
        return model, "module '0' (LSTM): recurrent layers read their weights through the list _flat_weights"

    def unscriptable():
        model = nn.Sequential(nn.Linear(3, 3), ReadsWeightByName())
        prepare_with_masks(model, {"1.weight": torch.ones(3, 3)})
        return model, ("module '1' (ReadsWeightByName) was converted, but TorchScript cannot compile it (does its "
                       "forward read a pruned tensor other than as self.<name>?)")

    def unscriptable_hooks():
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
        model[1].register_forward_pre_hook(halves_with_a_set)
        model[1].register_forward_hook(doubles_with_a_set)
        prepare_with_masks(model, {"1.weight": torch.ones(3, 3)})
        return model, ("module '1' (Linear) was converted, but TorchScript cannot compile its hooks "
                       "['halves_with_a_set', 'doubles_with_a_set'] (remove them before scripting")

    def root_other_parametrization():
        model = nn.Linear(3, 3)
        parametrize.register_parametrization(model, "bias", Double())
        return model, "the model itself (Linear): tensor 'bias' has the parametrizations ['Double']"

    return {f.__name__: f for f in [other_parametrization, two_masks, structured_and_another, integer_tensor, name_taken,
                                    bad_mask_dtype, recurrent, unscriptable, unscriptable_hooks,
                                    root_other_parametrization]}


@pytest.mark.parametrize("case", list(_refusal_cases()))
def test_refusals_name_the_module_and_why(case):
    model, message = _refusal_cases()[case]()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match=re.escape(message)):
        convert(model, inplace=True)
    # Refused before anything changed (except for a module TorchScript
    # refuses, which is only found once converted).
    if case not in ("unscriptable", "unscriptable_hooks"):
        assert any(parametrize.is_parametrized(m) for m in model.modules())
        assert model.state_dict().keys() == state.keys()


def test_already_scripted_model_is_refused():
    with pytest.raises(ConversionError, match="already a ScriptModule"):
        convert(torch.jit.script(nn.Linear(2, 2)))
