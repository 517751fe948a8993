"""What convert() refuses for models pruned with torch.nn.utils.prune, on
both targets, in place or not: each refusal names the module and the tensor,
and the model (tensors, hooks, pruning state) is left as it was."""

import re

import pytest
import torch
from torch import nn
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize, prune

from sparsity_testing import assert_module_unchanged, module_snapshot
from torch_sparsity.convert import ConversionError, convert
from torch_sparsity.sparsifiers import prepare_with_masks

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
]

TARGETS = ["torchscript", "export"]


class Doubling(prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        return default_mask

    def apply_mask(self, module):
        return 2 * super().apply_mask(module)


class Noisy(prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        return default_mask

    def __call__(self, module, inputs):
        setattr(module, self._tensor_name, self.apply_mask(module) + 1)


def _refusal_cases():
    def linear_model():
        return nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.Linear(3, 3)))

    def parametrized_orig():
        model = linear_model()
        prune.l1_unstructured(model[1][0], "weight", amount=0.5)
        parametrize.register_parametrization(model[1][0], "weight_orig", FakeSparsity(torch.ones(3, 3)))
        return model, ("module '1.0' (Linear): tensor 'weight' is pruned by torch.nn.utils.prune and 'weight_orig' "
                       "has a parametrization too")

    def pruned_parametrization():
        model = linear_model()
        prepare_with_masks(model, {"1.0.weight": torch.rand(3, 3) > 0.5})
        prune.l1_unstructured(model[1][0].parametrizations.weight, "original", amount=0.5)
        return model, ("module '1.0' (Linear): tensor 'weight' has a FakeSparsity parametrization whose own "
                       "tensors are pruned by torch.nn.utils.prune too")

    def two_hooks():
        # prune's own functions never leave two hooks on a tensor (they
        # combine them into a PruningContainer); registered by hand:
        model = linear_model()
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        extra = prune.RandomUnstructured(amount=0.3)
        extra._tensor_name = "weight"
        model[0].register_forward_pre_hook(extra)
        return model, "module '0' (Linear): tensor 'weight' has two torch.nn.utils.prune hooks (L1Unstructured and RandomUnstructured)"

    def overridden_apply_mask():
        model = linear_model()
        Doubling.apply(model[1][0], "bias")
        return model, "module '1.0' (Linear): tensor 'bias' is pruned by Doubling, which overrides apply_mask"

    def overridden_call():
        model = linear_model()
        Noisy.apply(model[0], "weight")
        return model, "module '0' (Linear): tensor 'weight' is pruned by Noisy, which overrides __call__"

    def mask_of_another_shape():
        model = linear_model()
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        model[0].weight_mask = torch.ones(3, 1)  # prune's forward broadcasts it
        return model, "module '0' (Linear): the mask of tensor 'weight' has shape (3, 1) but the tensor has (3, 4)"

    def mask_on_another_device():
        model = linear_model()
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        model[0].weight_mask = torch.ones(3, 4, device="meta")
        return model, "module '0' (Linear): the mask of tensor 'weight' is on meta but the tensor on cpu"

    def missing_mask():
        model = linear_model()
        prune.l1_unstructured(model[1][0], "weight", amount=0.5)
        del model[1][0]._buffers["weight_mask"]
        return model, "module '1.0' (Linear): tensor 'weight' is pruned by torch.nn.utils.prune (L1Unstructured), but the module has no buffer 'weight_mask'"

    def method_as_forward_hook():
        model = linear_model()
        model[0].register_forward_hook(prune.L1Unstructured(amount=0.5))
        return model, "module '0' (Linear): a torch.nn.utils.prune method (L1Unstructured) is registered in _forward_hooks"

    def hook_with_kwargs():
        model = linear_model()
        method = prune.l1_unstructured(model[0], "weight", amount=0.5)._forward_pre_hooks.popitem()[1]
        model[0].register_forward_pre_hook(method, with_kwargs=True)
        return model, "module '0' (Linear): tensor 'weight': its torch.nn.utils.prune hook (L1Unstructured) is registered with_kwargs"

    def integer_tensor():
        model = linear_model()
        model[0].steps = nn.Parameter(torch.arange(4), requires_grad=False)
        prune.identity(model[0], "steps")
        return model, "module '0' (Linear): tensor 'steps' has dtype torch.int64"

    def name_taken():
        model = linear_model()
        model[0].weight_original = 1
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        return model, "module '0' (Linear): cannot hold tensor 'weight' as 'weight_original'"

    def recurrent():
        model = nn.Sequential(nn.LSTM(3, 3))
        prune.l1_unstructured(model[0], "weight_hh_l0", amount=0.5)
        return model, "module '0' (LSTM): recurrent layers read their weights through the list _flat_weights"

    def model_itself():
        model = nn.Linear(3, 3)
        Doubling.apply(model, "weight")
        return model, "the model itself (Linear): tensor 'weight' is pruned by Doubling, which overrides apply_mask"

    return {f.__name__: f for f in [
        parametrized_orig, pruned_parametrization, two_hooks, overridden_apply_mask, overridden_call,
        mask_of_another_shape, mask_on_another_device, missing_mask, method_as_forward_hook, hook_with_kwargs,
        integer_tensor, name_taken, recurrent, model_itself,
    ]}


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "copy"])
@pytest.mark.parametrize("case", list(_refusal_cases()))
def test_refusals_name_module_and_tensor_and_change_nothing(case, inplace):
    torch.manual_seed(0)
    model, message = _refusal_cases()[case]()
    before = module_snapshot(model)
    for target in TARGETS:
        with pytest.raises(ConversionError, match=re.escape(message)):
            convert(model, inplace=inplace, target=target)
        assert_module_unchanged(model, before)
