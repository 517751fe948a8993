"""torch_sparsity.convert: models pruned with torch.ao.pruning, converted and
scripted, against the eager parametrized model in the same process."""

import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import parametrize

from sparsity_testing import assert_bitwise_equal, make_x, max_abs_diff
from end_to_end_models import (
    INPUT_SHAPES,
    eager_pruned_tensors,
    forward_backward,
    hand_made_masks,
    pruned_model,
    sparsity_run,
)
from torch_sparsity import utils as sparsity_utils
from torch_sparsity.cli import main
from torch_sparsity.convert import (
    ConversionError,
    compact_mask,
    convert,
    converted_name,
    fake_sparsities,
    mask_bytes,
    squash,
)
from torch_sparsity.sparsifiers import NDWeightNormSparsifier, prepare_with_masks, prune_with_weight_norm

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


def assert_outputs_equal(actual, expected):
    """Under ATOL, and under ATOL relative to the output's size, so that a
    model whose outputs are all tiny still has to match."""
    diff = max_abs_diff(actual, expected)
    scale = max(expected.abs().max().item(), 1e-30)
    assert diff < ATOL and diff / scale < ATOL, f"max |diff| {diff} for outputs of size {scale}"


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


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8])
def test_compact_mask_rules(x_dtype, mask_dtype):
    x = make_x((64,), x_dtype)  # NaN, +-Inf, +-0 among ordinary values
    ones_and_zeros = (torch.arange(64) % 3 == 0).to(mask_dtype)
    compact = compact_mask(ones_and_zeros, x)
    if torch.promote_types(x_dtype, mask_dtype) == x_dtype:
        assert compact.dtype == torch.bool
        assert torch.equal(compact, ones_and_zeros != 0)
    else:  # a bool mask would change the result's dtype (float32 mask, float16 x)
        assert compact is ones_and_zeros
    # Either way, the result is what the mask itself gives, bit for bit.
    assert_bitwise_equal(torch.ops.sparsity.fake_sparsity(x, compact), torch.ops.sparsity.fake_sparsity(x, ones_and_zeros))


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan"), float("inf"), -0.0])
def test_compact_mask_keeps_masks_a_bool_would_change(value):
    mask = torch.tensor([1.0, 0.0, value, 1.0])
    assert compact_mask(mask, torch.randn(4)) is mask


def test_compact_mask_leaves_bool_meta_and_trained_masks():
    mask = torch.tensor([True, False])
    assert compact_mask(mask, torch.randn(2)) is mask
    meta = torch.ones(2, device="meta")
    assert compact_mask(meta, torch.randn(2)) is meta
    trained = torch.tensor([1.0, 0.0], requires_grad=True)
    assert compact_mask(trained, torch.randn(2)) is trained


def test_inplace_conversion_can_compact_on_request():
    model = nn.Sequential(nn.Linear(4, 4))
    prepare_with_masks(model, {"0.weight": (torch.rand(4, 4) > 0.5).float()})
    eager_mask = model[0].parametrizations.weight[0].mask
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = model(x)
    convert(model, inplace=True, compact_masks=True)
    assert model[0].weight_sparsity.mask.dtype == torch.bool
    assert torch.equal(model[0].weight_sparsity.mask, eager_mask != 0)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(model)(x), expected)


def test_mask_bytes_counts_each_storage_once():
    shared = torch.ones(10, 10)
    assert mask_bytes({"a": shared, "b": shared, "c": torch.ones(3, dtype=torch.bool)}) == 400 + 3
    sparsity = torch.classes.sparsity.FakeSparsity(torch.ones(5, dtype=torch.bool))
    assert mask_bytes({"w": sparsity}) == 5


# -------------------------------------------------------------- refusals


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
        from torch.ao.pruning._experimental.pruner import FakeStructuredSparsity

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
        return model, "module '1' (ReadsWeightByName) was converted, but TorchScript cannot compile it"

    def root_other_parametrization():
        model = nn.Linear(3, 3)
        parametrize.register_parametrization(model, "bias", Double())
        return model, "the model itself (Linear): tensor 'bias' has the parametrizations ['Double']"

    return {f.__name__: f for f in [other_parametrization, two_masks, structured_and_another, integer_tensor, name_taken,
                                    bad_mask_dtype, recurrent, unscriptable, root_other_parametrization]}


@pytest.mark.parametrize("case", list(_refusal_cases()))
def test_refusals_name_the_module_and_why(case):
    model, message = _refusal_cases()[case]()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match=re.escape(message)):
        convert(model, inplace=True)
    # Refused before anything changed (except for a module TorchScript
    # refuses, which is only found once converted).
    if case != "unscriptable":
        assert any(parametrize.is_parametrized(m) for m in model.modules())
        assert model.state_dict().keys() == state.keys()


def test_already_scripted_model_is_refused():
    with pytest.raises(ConversionError, match="already a ScriptModule"):
        convert(torch.jit.script(nn.Linear(2, 2)))


def test_converted_name():
    assert converted_name("layer1.0.conv1.parametrizations.weight.original") == "layer1.0.conv1.weight_original"
    assert converted_name("parametrizations.class_token.original") == "class_token_original"
    assert converted_name("layer1.0.bn1.running_mean") == "layer1.0.bn1.running_mean"


# ------------------------------------------------------------- sparsifiers


def test_nd_weight_norm_sparsifier_matches_weight_norm_on_2d_and_prunes_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 16))
    reference = copy.deepcopy(model)
    prune_with_weight_norm(model, 0.5)
    sparsifier = WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(reference, [{"tensor_fqn": "2.weight"}])
    sparsifier.step()
    assert torch.equal(model[2].parametrizations.weight[0].mask, reference[2].parametrizations.weight[0].mask)
    conv_mask = model[0].parametrizations.weight[0].mask
    assert conv_mask.shape == (8, 3, 3, 3)
    assert (conv_mask == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    # Whole blocks of 4 along the flattened (in, kh, kw) dims.
    flat = conv_mask.reshape(8, 27)[:, :24].reshape(8, 6, 4)
    assert torch.all((flat == flat[..., :1]))
    assert isinstance(NDWeightNormSparsifier(), WeightNormSparsifier)


# ------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def small_factory(tmp_path_factory):
    """A module:callable for the command line, that builds a small CNN."""
    import sys

    folder = tmp_path_factory.mktemp("factory")
    (folder / "cli_models.py").write_text(
        "import torch\n"
        "def small_cnn():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))\n"
    )
    sys.path.insert(0, str(folder))
    yield "cli_models:small_cnn"
    sys.path.remove(str(folder))


def test_command_line_prunes_converts_and_saves(small_factory, tmp_path, capsys):
    out = tmp_path / "model.pt"
    status = main(["--model", small_factory, "--sparsity", "0.5", "-o", str(out), "--input-shape", "2,3,6,6",
                   "--save-input", str(tmp_path / "in.pt"), "--save-output", str(tmp_path / "out.pt"),
                   "--benchmark", "2"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "converted 2 pruned tensors" in printed
    assert "max |scripted - eager| on a random (2, 3, 6, 6) input: 0" in printed
    assert "eager parametrized" in printed and "scripted and squashed" in printed
    loaded = torch.jit.load(str(out))
    assert set(fake_sparsities(loaded)) == {"0.weight", "4.weight"}
    assert all(sparsity.mask.dtype == torch.bool for sparsity in fake_sparsities(loaded).values())
    mask_kib = sum(sparsity.mask.numel() for sparsity in fake_sparsities(loaded).values()) / 1024
    assert f"masks: {mask_kib / 1024:.1f} MiB, bool (as the sparsifier made them: {4 * mask_kib / 1024:.1f} MiB, float32)" in printed
    with torch.no_grad():
        assert_outputs_equal(loaded(torch.load(tmp_path / "in.pt")), torch.load(tmp_path / "out.pt"))


def test_command_line_writes_an_aoti_package_too(small_factory, tmp_path, capsys):
    from torch_sparsity import aoti

    package = tmp_path / "model.pt2"
    status = main(["--model", small_factory, "--sparsity", "0.5", "-o", str(tmp_path / "model.pt"),
                   "--input-shape", "2,3,6,6", "--save-input", str(tmp_path / "in.pt"),
                   "--save-output", str(tmp_path / "out.pt"), "--aoti-package", str(package)])
    assert status == 0
    assert f"AOTInductor package of the same model (2 masks live) saved to {package}" in capsys.readouterr().out
    runner = aoti.load(package)
    assert runner.mask_names() == ["0.weight", "4.weight"]
    assert runner.mask("4.weight").dtype == torch.bool
    expected = torch.load(tmp_path / "out.pt")
    output = runner(torch.load(tmp_path / "in.pt"))
    assert max_abs_diff(output, expected) <= 1e-5 * expected.abs().max().item()


def test_command_line_keeps_mask_dtype_on_request(small_factory, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["--model", small_factory, "--sparsity", "0.5", "-o", str(out), "--keep-mask-dtype"]) == 0
    assert "masks: 0.0 MiB, float32 (as the sparsifier made them: 0.0 MiB, float32)" in capsys.readouterr().out
    assert all(s.mask.dtype == torch.float32 for s in fake_sparsities(torch.jit.load(str(out))).values())


@pytest.mark.parametrize("form", ["dict", "sparsifier_state"])
def test_command_line_masks_and_weights_files(small_factory, tmp_path, form):
    torch.manual_seed(3)
    model = __import__("cli_models").small_cnn().eval()
    masks = {"0.weight": torch.rand(8, 3, 3, 3) > 0.5, "1.weight": torch.rand(8) > 0.5}
    if form == "dict":
        torch.save(model.state_dict(), tmp_path / "weights.pt")  # the dense model's
        torch.save(masks, tmp_path / "masks.pt")
        reference = prepare_with_masks(model, masks)
    else:
        sparsifier = WeightNormSparsifier()
        sparsifier.prepare(model, [{"tensor_fqn": fqn, "mask": mask} for fqn, mask in masks.items()])
        torch.save(model.state_dict(), tmp_path / "weights.pt")  # the parametrized model's
        torch.save(sparsifier.state_dict(), tmp_path / "masks.pt")
        reference = model
    out = tmp_path / "model.pt"
    args = ["--model", small_factory, "--weights", str(tmp_path / "weights.pt"), "--masks", str(tmp_path / "masks.pt"),
            "-o", str(out)]
    if form == "sparsifier_state":
        # A sparsifier's state_dict() holds a defaultdict, which torch.load
        # only reads with weights_only=False.
        with pytest.raises(SystemExit, match="if you trust it, add --trust-files"):
            main(args)
        args.append("--trust-files")
    assert main(args) == 0
    loaded = torch.jit.load(str(out))
    for fqn, mask in masks.items():
        assert torch.equal(fake_sparsities(loaded)[fqn].mask, mask)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_outputs_equal(loaded(x), reference(x))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.5"], "--sparsity must be in"),
        (["--benchmark", "3"], "need --input-shape"),
        (["--aoti-package", "m.pt2"], "--benchmark and --aoti-package need --input-shape"),
        (["--sparsity", "0.5", "--masks", "m.pt"], "not allowed with argument"),
    ],
)
def test_command_line_bad_arguments(small_factory, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", small_factory, "-o", str(tmp_path / "m.pt")] + args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line_bad_model_and_refusal(small_factory, tmp_path, capsys):
    with pytest.raises(SystemExit, match="cannot find no_such_module:f"):
        main(["--model", "no_such_module:f", "-o", str(tmp_path / "m.pt")])
    with pytest.raises(SystemExit, match="--input-shape: expected comma-separated sizes"):
        main(["--model", small_factory, "-o", str(tmp_path / "m.pt"), "--input-shape", "2,x"])
    torch.save({"1.num_batches_tracked": torch.ones((), dtype=torch.long)}, tmp_path / "masks.pt")
    assert main(["--model", small_factory, "--masks", str(tmp_path / "masks.pt"), "-o", str(tmp_path / "m.pt")]) == 1
    assert "cannot convert: module '1' (BatchNorm2d)" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_command_line(tmp_path):
    """python -m torch_sparsity.convert runs as a program, from any folder."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "torch_sparsity.convert", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0 and "--sparsity" in result.stdout
    assert "python -m torch_sparsity.convert" in result.stdout
