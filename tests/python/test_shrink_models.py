"""shrink on every pruning source, eager and converted (target "export"),
on torchvision models, and its refusals: the shrunk model computes what the
masked model computes, has the expected channel counts, keeps the masks
that remain live and sliced, and leaves the input model as it was."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.ao.pruning._experimental.pruner import SaliencyPruner
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize, prune

import torch_sparsity
from torch_sparsity.convert import convert
from end_to_end_models import _lively_random_weights
from shrink_models import mask_internal_channels, masked_torchvision_model, refresh_pruned
from sparsity_testing import assert_module_unchanged, assert_outputs_equal, module_snapshot

SOURCES = [
    "ln_structured", "random_structured", "custom_from_mask", "fake_sparsity_rows",
    "saliency_prune_bias", "saliency_keep_bias",
]
FORMS = ["eager", "export"]


class Net(nn.Module):
    """conv1 (pruned) -> ReLU -> an unpadded conv2 (an unstructured mask
    that stays) -> pooled Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _pruned_net(source: str):
    """Net with half of conv1's rows masked by `source` (a zeroed row keeps its
    bias unless the source prunes it too: a constant that conv2 folds), and
    conv2's weight pruned unstructured (a mask that remains)."""
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    _lively_random_weights(model, x)
    rows = torch.tensor([True, False] * 4)
    if source == "ln_structured":
        prune.ln_structured(model.conv1, "weight", amount=0.5, n=2, dim=0)
    elif source == "random_structured":
        prune.random_structured(model.conv1, "weight", amount=0.5, dim=0)
    elif source == "custom_from_mask":
        prune.custom_from_mask(model.conv1, "weight", rows.reshape(-1, 1, 1, 1).expand(8, 3, 3, 3).float())
    elif source == "fake_sparsity_rows":  # an unstructured mask that happens to zero whole rows
        parametrize.register_parametrization(model.conv1, "weight", FakeSparsity(rows.reshape(-1, 1, 1, 1).expand(8, 3, 3, 3).float()))
    else:
        pruner = SaliencyPruner({})
        pruner.prepare(model, [{"tensor_fqn": "conv1.weight", "sparsity_level": 0.5,
                                "prune_bias": source == "saliency_prune_bias"}])
        pruner.step()
    prune.l1_unstructured(model.conv2, "weight", amount=0.3)
    refresh_pruned(model)
    return model.eval(), x


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("source", SOURCES)
def test_every_source_shrinks_exactly_and_keeps_the_remaining_masks(source, form):
    model, x = _pruned_net(source)
    with torch.no_grad():
        model(x)  # BiasHook zeroes the pruned rows of the bias on its first forward
    if form == "export":
        model = convert(model, target="export")
    with torch.no_grad():
        expected = model(x)
    snapshot = module_snapshot(model)  # after the forward, which sets prune's tensors anew
    small = torch_sparsity.shrink(model, (x,))
    assert_module_unchanged(model, snapshot)
    with torch.no_grad():
        assert_outputs_equal(small(x), expected)
        assert_outputs_equal(model(x), expected)  # the input model still runs as it did
    assert small.conv1.out_channels == small.conv2.in_channels == 4
    assert small.conv2.weight.shape == (6, 4, 1, 1)
    if form == "export":
        before, after = torch_sparsity.masks(model), torch_sparsity.masks(small)
        assert after.keys() == before.keys()
        assert after["conv2.weight"].shape == (6, 4, 1, 1)
    else:
        assert small.conv2.weight_mask.shape == small.conv2.weight_orig.shape == (6, 4, 1, 1)
        # prune's computed tensor is there before any forward, as pruning leaves it
        assert torch.equal(small.conv2.weight, small.conv2.weight_orig * small.conv2.weight_mask)
    with torch.no_grad():  # the remaining mask is live: zeroing it changes the output
        mask = torch_sparsity.masks(small)["conv2.weight"] if form == "export" else small.conv2.weight_mask
        mask.zero_()
        refresh_pruned(small)
        assert not torch.allclose(small(x), expected)


@pytest.mark.parametrize("form", FORMS)
def test_inplace_shrinks_the_model_itself(form):
    model, x = _pruned_net("saliency_keep_bias")
    with torch.no_grad():
        model(x)
    if form == "export":
        model = convert(model, target="export")
    with torch.no_grad():
        expected = model(x)
    conv1 = model.conv1
    small = torch_sparsity.shrink(model, x, inplace=True)
    assert small is model and model.conv1 is conv1 and conv1.out_channels == 4
    with torch.no_grad():
        assert_outputs_equal(model(x), expected)


def test_the_shrunk_model_keeps_the_training_mode_and_is_exact_in_eval():
    model, x = _pruned_net("ln_structured")
    with torch.no_grad():
        expected = model(x)
    small = torch_sparsity.shrink(model.train(), x)
    assert small.training and model.training
    with torch.no_grad():
        assert_outputs_equal(small.eval()(x), expected)


def _small_vit():
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ), torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v3_small", "vit"])
def test_torchvision_models_lose_their_masked_internal_channels(name):
    if name == "vit":
        torch.manual_seed(0)
        model, x = _small_vit()
        _lively_random_weights(model, x)
        kept = mask_internal_channels(model)
        model.eval()
    else:
        model, x, kept = masked_torchvision_model(name)
    with torch.no_grad():
        expected = model(x)
    snapshot = module_snapshot(model)
    report = torch_sparsity.shrink_report(model, (x,))
    assert_module_unchanged(model, snapshot)
    small = report.model
    with torch.no_grad():
        assert_outputs_equal(small(x), expected)
    for fqn, channels in kept.items():
        module = small.get_submodule(fqn)
        count = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        assert count == int(channels.sum()), fqn
        assert report.removed_channels[fqn] == (~channels).nonzero().flatten().tolist(), fqn
    assert report.after.multiply_adds < 0.9 * report.before.multiply_adds
    assert report.after.parameters < report.before.parameters and report.after.bytes < report.before.bytes
    assert sum(group.removed for group in report.groups) == sum(int((~c).sum()) for c in kept.values())


def test_shrinks_on_the_model_device(device):
    model, x, kept = masked_torchvision_model("resnet18")
    model, x = model.to(device), x.to(device)
    refresh_pruned(model)
    with torch.no_grad():
        expected = model(x)
    small = torch_sparsity.shrink(model, x)
    assert all(p.device == x.device for p in small.parameters())
    assert small.layer1[0].conv1.out_channels == int(kept["layer1.0.conv1"].sum())
    with torch.no_grad():
        assert_outputs_equal(small(x), expected)


@pytest.mark.parametrize("name", ["squeezenet1_0", "shufflenet_v2_x0_5", "densenet121", "googlenet", "efficientnet_b0"])
def test_every_layer_pruned_shrinks_exactly(name):
    """Concatenations (squeezenet, densenet, googlenet), channel shuffles and
    splits (shufflenet), squeeze-excitation and depthwise convolutions
    (efficientnet), with 40% of the rows of every Conv and Linear masked
    and BatchNorm statistics that turn zero rows into constants."""
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model, x = torchvision.models.get_model(name, weights=None, **extra), torch.randn(1, 3, 64, 64)
    _lively_random_weights(model, x)
    for module in list(model.modules()):
        if type(module) in (nn.Conv2d, nn.Linear):
            prune.ln_structured(module, "weight", amount=0.4, n=1, dim=0)
    refresh_pruned(model)
    with torch.no_grad():
        expected = model.eval()(x)
    report = torch_sparsity.shrink_report(model, x)
    with torch.no_grad():
        assert_outputs_equal(report.model(x), expected)
    assert report.after.multiply_adds < 0.8 * report.before.multiply_adds


def test_the_report_says_why_attention_channels_stay():
    torch.manual_seed(0)
    model, x = _small_vit()
    report = torch_sparsity.shrink_report(model.eval(), x)
    text = str(report)
    assert "self_attention" in text and "no Linear's own weight" in text and "multiply-adds" in text


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        return x if x.sum() > 0 else -x  # a branch on the data: torch.export cannot capture it


@pytest.mark.parametrize("case,message", [
    ("no inputs", "needs example_inputs"),
    ("empty inputs", "needs example_inputs"),
    ("wrong shape", "does not run on example_inputs"),
    ("not exportable", "torch.export cannot capture"),
    ("torchscript target", "target 'torchscript'"),
    ("scripted", "eager nn.Module"),
])
def test_bad_input_is_refused_and_changes_nothing(case, message):
    model, x = _pruned_net("custom_from_mask")
    inputs = {"no inputs": None, "empty inputs": (), "wrong shape": (torch.randn(2, 5, 8, 8),)}.get(case, (x,))
    if case == "not exportable":
        model = DataDependent()
        prune.ln_structured(model.conv, "weight", amount=0.5, n=2, dim=0)
        refresh_pruned(model)
    elif case == "torchscript target":
        model = convert(model)
    elif case == "scripted":
        model = torch.jit.script(convert(model))
    snapshot = module_snapshot(model)
    with pytest.raises(torch_sparsity.ShrinkError, match=message):
        torch_sparsity.shrink(model, inputs)
    if case != "scripted":  # a ScriptModule has no Python modules to compare
        assert_module_unchanged(model, snapshot)
    assert issubclass(torch_sparsity.ShrinkError, ValueError)


def test_shrunk_model_deep_copies_and_shrinks_again_to_the_same():
    model, x, _ = masked_torchvision_model("resnet18")
    small = torch_sparsity.shrink(model, x)
    again = torch_sparsity.shrink(copy.deepcopy(small), x)
    assert [p.shape for p in again.parameters()] == [p.shape for p in small.parameters()]
