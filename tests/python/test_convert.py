"""torch_sparsity.convert: models pruned with torch.ao.pruning, converted and
scripted, against the eager parametrized model in the same process. Its
refusals are in test_convert_refusals.py, its masks in test_masks.py, its
command line in test_cli.py."""

import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import parametrize

from sparsity_testing import assert_outputs_equal, max_abs_diff
from end_to_end_models import eager_pruned_tensors, forward_backward, hand_made_masks, pruned_model, sparsity_run
from torch_sparsity import utils as sparsity_utils
from torch_sparsity.convert import convert, converted_name, fake_sparsities, mask_bytes, squash
from torch_sparsity.sparsifiers import prepare_with_masks

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The default weight initialization of:FutureWarning"),
]

MAIN_MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16"]
METHODS = ["weight_norm", "hand_made"]
# Every module type of torchvision's classification models that holds tensors
# appears in MAIN_MODELS or in these (test_every_torchvision_layer_type_is_covered).
MORE_MODELS = ["convnext_tiny", "maxvit_t", "swin_t", "swin_v2_t"]
ATOL = 1e-5


def fresh_scripted(pruned):
    """A scripted model of its own (copy.deepcopy of a ScriptModule gives
    parameters that are not leaves, which an optimizer refuses; converting
    again is quicker than torch.jit.save and load)."""
    return torch.jit.script(convert(pruned.model))


def assert_same_gradients(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        if expected[name] is None:
            assert actual[name] is None, name
        else:
            assert max_abs_diff(actual[name], expected[name]) < ATOL, name


@pytest.fixture(scope="module", params=[(m, k) for m in MAIN_MODELS for k in METHODS], ids=lambda p: "-".join(p))
def pruned(request):
    name, method = request.param
    model, example = pruned_model(name, method)
    converted = convert(model)
    scripted = torch.jit.script(converted)  # shares its tensors with converted
    with torch.no_grad():
        expected = model(example)
    return SimpleNamespace(
        name=name, method=method, model=model, example=example, converted=converted, scripted=scripted, expected=expected
    )


# ------------------------------------------------------------ main models


def test_scripted_output_equals_eager(pruned):
    assert len(fake_sparsities(pruned.scripted)) == len(eager_pruned_tensors(pruned.model)) > 0
    with torch.no_grad():
        assert_outputs_equal(pruned.scripted(pruned.example), pruned.expected)


def test_saved_model_loaded_in_python_and_cpp(pruned, tmp_path):
    model_file, input_file, expected_file = tmp_path / "model.pt", tmp_path / "input.pt", tmp_path / "expected.pt"
    torch.jit.save(pruned.scripted, str(model_file))
    torch.save(pruned.example, input_file)
    torch.save(pruned.expected, expected_file)
    with torch.no_grad():
        assert_outputs_equal(torch.jit.load(str(model_file))(pruned.example), pruned.expected)

    result = sparsity_run(model_file, "--input", input_file, "--expect", expected_file, "--atol", ATOL, "--runs", 1)
    assert result.returncode == 0, result.stdout + result.stderr
    diff = float(re.search(r"max \|output - expected\| = (\S+)", result.stdout).group(1))
    assert diff < ATOL
    assert f"pruned tensors: {len(eager_pruned_tensors(pruned.model))}\n" in result.stdout


def test_masks_are_the_eager_masks_stored_as_bool(pruned):
    sparsities = fake_sparsities(pruned.scripted)
    eager = eager_pruned_tensors(pruned.model)
    assert sparsities.keys() == eager.keys()
    for fqn, (module, name) in eager.items():
        eager_mask = module.parametrizations[name][0].mask
        mask = sparsities[fqn].mask
        assert mask.dtype == torch.bool, fqn
        assert torch.equal(mask, eager_mask != 0), fqn
    eager_bytes = mask_bytes({fqn: module.parametrizations[name][0].mask for fqn, (module, name) in eager.items()})
    assert mask_bytes(sparsities) == sum(mask.numel() for mask in sparsities.values() for mask in [mask.mask])
    if pruned.method == "weight_norm":  # float32 masks from the sparsifier
        assert mask_bytes(sparsities) * 4 == eager_bytes


def test_masks_kept_in_their_dtype_on_request(pruned):
    kept = fake_sparsities(convert(pruned.model, compact_masks=False, check_scriptable=False))
    for fqn, (module, name) in eager_pruned_tensors(pruned.model).items():
        eager_mask = module.parametrizations[name][0].mask
        assert kept[fqn].mask.dtype == eager_mask.dtype, fqn
        assert torch.equal(kept[fqn].mask, eager_mask), fqn


def test_bool_masks_give_the_same_outputs_and_gradients_bit_for_bit(pruned):
    kept = torch.jit.script(convert(pruned.model, compact_masks=False))
    compact = fresh_scripted(pruned)
    # Unoptimized, both run one plan: the profiling executor's first runs and the graph it
    # optimizes after them differ in the last bits (efficientnet_b0's gradients, when run alone).
    with torch.jit.optimized_execution(False):
        kept_output, kept_grads = forward_backward(kept, [pruned.example])
        compact_output, compact_grads = forward_backward(compact, [pruned.example])
    assert torch.equal(compact_output, kept_output)
    assert kept_grads.keys() == compact_grads.keys()
    for name, grad in kept_grads.items():
        assert (grad is None and compact_grads[name] is None) or torch.equal(compact_grads[name], grad), name


def test_training_step_gives_the_eager_weights(pruned):
    eager = copy.deepcopy(pruned.model).train()
    scripted = fresh_scripted(pruned).train()
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    scripted_optimizer = torch.optim.SGD(scripted.parameters(), lr=0.1, momentum=0.9)

    eager_output, eager_grads = forward_backward(eager, [pruned.example])
    scripted_output, scripted_grads = forward_backward(scripted, [pruned.example])
    assert_outputs_equal(scripted_output, eager_output)
    assert_same_gradients(scripted_grads, eager_grads)

    for optimizer, grads, model in [(eager_optimizer, eager_grads, eager), (scripted_optimizer, scripted_grads, scripted)]:
        for name, param in model.named_parameters():
            param.grad = grads[converted_name(name)]
        optimizer.step()
    scripted_state = scripted.state_dict()
    eager_state = {converted_name(k): v for k, v in eager.state_dict().items()}
    assert scripted_state.keys() == eager_state.keys()
    for name, value in eager_state.items():  # weights, and BatchNorm's statistics
        assert max_abs_diff(scripted_state[name].double(), value.double()) < ATOL, name
    # The pruned weights the models compute with are equal too.
    for fqn, sparsity in fake_sparsities(scripted).items():
        module_fqn, _, name = fqn.rpartition(".")
        eager_weight = getattr(eager.get_submodule(module_fqn), name)
        assert max_abs_diff(sparsity.forward(scripted_state[fqn + "_original"]), eager_weight) < ATOL, fqn


def test_mask_updated_in_place_changes_next_output(pruned):
    # The mask of the last pruned weight matrix (near the output; torchvision
    # initializes biases to zero, so their masks change nothing), zeroed in
    # place, in the scripted model and in the eager one; restored afterwards.
    sparsities = fake_sparsities(pruned.scripted)
    fqn = [fqn for fqn, sparsity in sparsities.items() if sparsity.mask.dim() >= 2][-1]
    module, name = eager_pruned_tensors(pruned.model)[fqn]
    masks = [sparsities[fqn].mask, module.parametrizations[name][0].mask]
    saved = [mask.clone() for mask in masks]
    try:
        for mask in masks:
            mask.fill_(0)
        with torch.no_grad():
            output = pruned.scripted(pruned.example)
            assert max_abs_diff(output, pruned.expected) > 1e-3
            assert_outputs_equal(output, pruned.model(pruned.example))
    finally:
        for mask, value in zip(masks, saved):
            mask.copy_(value)


def test_squash_leaves_no_masks_and_the_same_output(pruned):
    # (test_sparsity_run.py squashes in C++ and loads the saved result.)
    scripted = squash(fresh_scripted(pruned))
    assert fake_sparsities(scripted) == {}
    for _, module in scripted.named_modules():
        assert not sparsity_utils.module_contains_param(module, "FakeSparsity")
    with torch.no_grad():
        assert_outputs_equal(scripted(pruned.example), pruned.expected)


def test_names_state_dict_and_order(pruned):
    converted = pruned.converted
    eager_state = pruned.model.state_dict()
    # Same names; in a state dict a module's own parameters come before its
    # own buffers, so the order differs where buffers are pruned or kept.
    assert sorted(converted.state_dict()) == sorted(converted_name(k) for k in eager_state)
    for name, value in eager_state.items():
        assert torch.equal(converted.state_dict()[converted_name(name)], value)
    eager_names = [converted_name(n) for n, _ in pruned.model.named_parameters()]
    scripted_names = [n for n, _ in pruned.scripted.named_parameters()]
    # The order of parameters() is the same, except that modules with children
    # (vit_b_16's MultiheadAttention and the model itself) list their own
    # _original tensors before their children's, where the parametrized model
    # has them last.
    if pruned.name == "vit_b_16":
        assert sorted(scripted_names) == sorted(eager_names)
    else:
        assert scripted_names == eager_names
    # Nothing of the masks in the state dict; loading the eager one works.
    converted.load_state_dict({converted_name(k): v.clone() for k, v in eager_state.items()})


def test_convert_leaves_its_argument_alone():
    model, example = pruned_model("resnet18", "hand_made")
    before = copy.deepcopy(model.state_dict())
    converted = convert(model)
    assert parametrize.is_parametrized(model.conv1)
    assert converted.conv1.weight_original is not model.conv1.parametrizations.weight.original
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


# ---------------------------------------------------- every layer type


@pytest.mark.parametrize("name", MORE_MODELS)
def test_more_torchvision_models_outputs_and_gradients(name):
    model, example = pruned_model(name, "hand_made")
    scripted = torch.jit.script(convert(model))
    eager_output, eager_grads = forward_backward(model, [example])
    output, grads = forward_backward(scripted, [example])
    assert_outputs_equal(output, eager_output)
    assert_same_gradients(grads, eager_grads)


def _module_types_with_tensors(model):
    return {
        type(m) for m in model.modules() if next(m.parameters(recurse=False), None) is not None
        or next(m.buffers(recurse=False), None) is not None
    }


def test_every_torchvision_layer_type_is_covered():
    """The module types holding tensors in all of torchvision's classification
    models (one model per size is enough) all appear in the tested models."""
    all_types = set()
    for name in torchvision.models.list_models(module=torchvision.models):
        if name.startswith("regnet") and name not in ("regnet_x_400mf", "regnet_y_400mf"):
            continue  # regnets cannot be built on the meta device; the small ones have the same layers
        device = "cpu" if name.startswith("regnet") else "meta"
        with torch.device(device):
            all_types |= _module_types_with_tensors(torchvision.models.get_model(name, weights=None))
    tested_types = set()
    for name in MAIN_MODELS + MORE_MODELS:
        with torch.device("meta"):
            tested_types |= _module_types_with_tensors(torchvision.models.get_model(name, weights=None))
    assert all_types - tested_types == set()


class UserBlock(nn.Module):
    """A module type the converter has never seen: its own tensors, used in
    forward as self.<name>, one of them a buffer."""

    def __init__(self, features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, features) / features**0.5)
        self.gate = nn.Parameter(torch.randn(features))
        self.register_buffer("offset", torch.randn(features))

    def forward(self, x):
        return x + torch.tanh(x @ self.weight.t() + self.offset) * self.gate


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(6))  # a tensor of the model itself
        self.stages = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), UserBlock(6)) for _ in range(2)])
        self.heads = nn.ModuleDict({"out": nn.Sequential(nn.Sequential(UserBlock(6)), nn.Linear(6, 3))})

    def forward(self, x):
        x = x * self.scale
        for stage in self.stages:
            x = stage(x)
        return self.heads["out"](x)


def test_user_module_at_any_depth():
    torch.manual_seed(0)
    model = UserNet()
    masks = hand_made_masks(model, zeros=0.3)
    assert {"scale", "stages.1.1.offset", "heads.out.0.0.weight", "heads.out.1.bias"} <= masks.keys()
    prepare_with_masks(model, masks)
    x = torch.randn(4, 6)
    converted = convert(model)
    scripted = torch.jit.script(converted)
    assert set(fake_sparsities(scripted)) == set(masks)
    eager_output, eager_grads = forward_backward(model, [x])
    for candidate in (converted, scripted):
        output, grads = forward_backward(candidate, [x])
        assert_outputs_equal(output, eager_output)
        assert_same_gradients(grads, eager_grads)
    assert isinstance(converted.stages[0][1], UserBlock) and type(converted.stages[0][1]).__name__ == "UserBlock"
    assert sparsity_utils.module_contains_param(sparsity_utils.fqn_to_module(scripted, "heads.out.0.0"), "FakeSparsity")
    # The buffer stays a buffer, the parameters parameters.
    assert "offset_original" in dict(converted.stages[1][1].named_buffers())
    assert "gate_original" in dict(converted.stages[1][1].named_parameters())


def _layer_cases():
    """(layer, inputs) for torch.nn layers with options that change how the
    weight is used."""
    return [
        (nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), [torch.randn(2, 4, 9, 9)]),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False), [torch.randn(2, 3, 6, 6)]),
        (nn.Conv1d(3, 4, 3, stride=2), [torch.randn(2, 3, 11)]),
        (nn.Conv3d(2, 3, 2), [torch.randn(1, 2, 4, 4, 4)]),
        (nn.ConvTranspose2d(3, 4, 3, stride=2, groups=1), [torch.randn(2, 3, 5, 5)]),
        (nn.BatchNorm2d(4), [torch.randn(3, 4, 5, 5)]),
        (nn.LayerNorm([5]), [torch.randn(3, 5)]),
        (nn.GroupNorm(2, 4), [torch.randn(3, 4, 5)]),
        (nn.Embedding(10, 4), [torch.randint(0, 10, (3, 5))]),
        (nn.Bilinear(3, 4, 5), [torch.randn(2, 3), torch.randn(2, 4)]),
        (nn.PReLU(4), [torch.randn(2, 4, 3)]),
        (
            nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True),
            [torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 5)],
        ),
        (nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True), [torch.randn(2, 3, 8)]),
    ]


@pytest.mark.parametrize("case", range(len(_layer_cases())))
def test_torch_nn_layers(case):
    torch.manual_seed(0)
    layer, inputs = _layer_cases()[case]
    prepare_with_masks(layer, hand_made_masks(layer, zeros=0.4))
    layer.train()
    scripted = torch.jit.script(convert(layer))
    eager_output, eager_grads = forward_backward(layer, inputs)
    output, grads = forward_backward(scripted, inputs)
    assert_outputs_equal(output, eager_output)
    assert_same_gradients(grads, eager_grads)


def test_inplace_conversion_shares_the_sparsifiers_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2))
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    masks = {fqn: state["mask"] for fqn, state in sparsifier.state.items()}
    original = model[0].parametrizations.weight.original
    converted = convert(model, inplace=True)
    assert converted is model
    assert converted[0].weight_original is original
    scripted = torch.jit.script(converted)
    for fqn, sparsity in fake_sparsities(scripted).items():
        assert sparsity.mask.data_ptr() == masks[fqn].data_ptr(), fqn
    x = torch.randn(3, 8)
    before = scripted(x)
    masks["2.weight"].zero_()  # the sparsifier's tensor, edited in place
    after = scripted(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, torch.zeros_like(before) + converted[2].bias)


# ------------------------------------------------------------------ names


def test_converted_name():
    assert converted_name("layer1.0.conv1.parametrizations.weight.original") == "layer1.0.conv1.weight_original"
    assert converted_name("parametrizations.class_token.original") == "class_token_original"
    assert converted_name("layer1.0.bn1.running_mean") == "layer1.0.bn1.running_mean"
