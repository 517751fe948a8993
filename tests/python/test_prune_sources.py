"""convert() on models pruned with torch.nn.utils.prune, both targets, against
the eager pruned model in the same process: outputs and gradients bit for
bit (eager, scripted, exported), the layout, live masks and in-place
conversion. The refusals are in test_prune_sources_refusals.py."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import torch_sparsity
from end_to_end_models import NN_UTILS_PRUNE_METHODS, forward_backward, mha_slow_path, pruned_model
from sparsity_testing import assert_bitwise_equal, assert_module_unchanged, assert_same_results, make_x, module_snapshot
from torch_sparsity.convert import convert, fake_sparsities
from torch_sparsity.sparsifiers import prepare_with_masks

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The default weight initialization of:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),  # bit-for-bit gradients (conftest.py)
]

TARGETS = ["torchscript", "export"]


# ------------------------------------------------------------------ helpers


def prune_tensors(model):
    """{tensor fqn: (module, name)} for every tensor torch.nn.utils.prune
    prunes, found from its hooks (independently of torch_sparsity)."""
    found = {}
    for module_fqn, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                name = hook._tensor_name
                found[f"{module_fqn}.{name}" if module_fqn else name] = (module, name)
    return found


def prune_masks(model):
    return {fqn: getattr(module, name + "_mask") for fqn, (module, name) in prune_tensors(model).items()}


def renamer(pruned_model_):
    """Maps the pruned model's parameter and buffer names to the converted
    model's: T_orig -> T_original for the pruned tensors; None for prune's
    T_mask (out of the converted state dict)."""
    pruned = set(prune_tensors(pruned_model_))

    def rename(key):
        for suffix, new in (("_orig", "_original"), ("_mask", None)):
            if key.endswith(suffix) and key[: -len(suffix)] in pruned:
                return None if new is None else key[: -len(suffix)] + new
        return key

    return rename


def assert_pruned_tensors_read_the_same(converted, model):
    """Every pruned tensor, as the module reads it (prune's plain attribute,
    set by the last forward), bit for bit: -0 and NaN where prune has them."""
    for fqn, (module, name) in prune_tensors(model).items():
        module_fqn = fqn.rpartition(".")[0]
        assert_bitwise_equal(getattr(converted.get_submodule(module_fqn), name), getattr(module, name), fqn)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class KeepPositive(prune.BasePruningMethod):
    """A user's method that only defines its mask: converts."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        return default_mask * (t > 0)


def _iterative(m):
    prune.l1_unstructured(m.fc1, "weight", amount=0.3)
    prune.random_structured(m.fc1, "weight", amount=0.25, dim=0)
    prune.ln_structured(m.fc1, "weight", amount=0.25, n=2, dim=1)
    assert isinstance(m.fc1._forward_pre_hooks[next(iter(m.fc1._forward_pre_hooks))], prune.PruningContainer)


def _several_per_module(m):
    prune.l1_unstructured(m.fc1, "bias", amount=0.5)
    prune.l1_unstructured(m.fc1, "weight", amount=0.5)
    prune.random_unstructured(m.bn, "weight", amount=0.3)
    prune.l1_unstructured(m.bn, "bias", amount=0.3)
    prune.random_unstructured(m.fc1, "bias", amount=0.2)  # iterative, on a bias


def _special_weights(m):
    prune.l1_unstructured(m.fc2, "weight", amount=0.5)
    prune.random_unstructured(m.conv, "weight", amount=0.5)
    with torch.no_grad():  # NaN, +-Inf, -0 where prune masks and where it keeps
        m.fc2.weight_orig.copy_(make_x((5, 12), torch.float32))
        m.conv.weight_orig.view(-1)[:20] = make_x((20,), torch.float32)


def _float64_mask(m):
    prune.l1_unstructured(m.fc2, "weight", amount=0.5)
    m.fc2.weight_mask = m.fc2.weight_mask.double()  # prune computes mask.to(float32) * orig


CASES = {
    "l1_unstructured": lambda m: prune.l1_unstructured(m.fc1, "weight", amount=0.4),
    "random_unstructured": lambda m: prune.random_unstructured(m.conv, "weight", amount=0.5),
    "ln_structured_n1_dim0": lambda m: prune.ln_structured(m.conv, "weight", amount=0.5, n=1, dim=0),
    "ln_structured_n1_dim1": lambda m: prune.ln_structured(m.fc1, "weight", amount=0.5, n=1, dim=1),
    "ln_structured_n2_dim0": lambda m: prune.ln_structured(m.fc1, "weight", amount=0.5, n=2, dim=0),
    "ln_structured_n2_dim1": lambda m: prune.ln_structured(m.conv, "weight", amount=0.5, n=2, dim=1),
    "random_structured": lambda m: prune.random_structured(m.fc1, "weight", amount=0.3, dim=1),
    "identity": lambda m: prune.identity(m.fc2, "weight"),
    "custom_from_mask": lambda m: prune.custom_from_mask(m.fc2, "weight", mask=torch.rand(5, 12) > 0.5),
    "custom_from_mask_scaling": lambda m: prune.custom_from_mask(m.fc1, "weight", mask=torch.rand(12, 96)),
    "global_unstructured": lambda m: prune.global_unstructured(
        [(m.conv, "weight"), (m.fc1, "weight"), (m.fc1, "bias"), (m.fc2, "weight")],
        pruning_method=prune.L1Unstructured, amount=0.5,
    ),
    "iterative": _iterative,
    "several_per_module": _several_per_module,
    "user_compute_mask": lambda m: KeepPositive.apply(m.fc1, "weight"),
    "special_weights": _special_weights,
    "float64_mask": _float64_mask,
}


def small_pruned(case):
    torch.manual_seed(0)  # the random_* methods draw from the global generator
    model = Net().eval()
    CASES[case](model)
    assert prune.is_pruned(model)
    return model, torch.randn(2, 3, 4, 4)


# ------------------------------------------------------- small models


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", list(CASES))
def test_eager_output_and_gradients_bit_for_bit(case, target):
    model, x = small_pruned(case)
    expected = forward_backward(model, [x])
    converted = convert(model, target=target)
    assert_same_results(forward_backward(converted, [x]), expected, renamer(model))
    assert_pruned_tensors_read_the_same(converted, model)


@pytest.mark.parametrize("form", ["scripted", "exported-strict", "exported-non-strict"])
@pytest.mark.parametrize("case", list(CASES))
def test_scripted_and_exported_outputs_bit_for_bit(case, form):
    model, x = small_pruned(case)
    if form == "scripted":
        scripted = torch.jit.script(convert(model))
        assert_same_results(forward_backward(scripted, [x]), forward_backward(model, [x]), renamer(model))
        assert fake_sparsities(scripted).keys() == prune_tensors(model).keys()
    else:
        program = torch.export.export(convert(model, target="export"), (x,), strict=form == "exported-strict")
        with torch.no_grad():
            assert_bitwise_equal(program.module()(x), model(x), "output")
        assert torch_sparsity.masks(program).keys() == prune_tensors(model).keys()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", list(CASES))
def test_layout_state_dict_and_masks(case, target):
    model, _ = small_pruned(case)
    rename = renamer(model)
    converted = convert(model, target=target)
    found = torch_sparsity.masks(converted)
    assert found.keys() == prune_tensors(model).keys()
    for fqn, (module, name) in prune_tensors(model).items():
        new = converted.get_submodule(fqn.rpartition(".")[0])
        assert isinstance(new, type(module)) and type(new).__name__ == type(module).__name__, fqn
        assert not any(isinstance(h, prune.BasePruningMethod) for h in new._forward_pre_hooks.values()), fqn
        assert name not in vars(new) and not hasattr(new, name + "_orig"), fqn
        original = getattr(new, name + "_original")
        assert isinstance(original, nn.Parameter), fqn
        assert_bitwise_equal(original, getattr(module, name + "_orig"), fqn)
        prune_mask = getattr(module, name + "_mask")
        # The same mask, as prune reads it; bool where that is exact.
        assert torch.equal(found[fqn].to(original.dtype), prune_mask.to(original.dtype)), fqn
        assert (found[fqn].dtype == torch.bool) == (case != "custom_from_mask_scaling"), fqn
        if target == "torchscript":
            assert name + "_mask" not in new._buffers, fqn
            assert found[fqn].data_ptr() == getattr(new, name + "_sparsity").mask.data_ptr(), fqn
        else:
            assert new._buffers[name + "_mask"] is found[fqn], fqn
            assert name + "_mask" in new._non_persistent_buffers_set, fqn
    assert not prune.is_pruned(converted)
    # State dict: T_orig -> T_original, no masks; parameters in the same order.
    expected_state = {rename(k): v for k, v in model.state_dict().items() if rename(k) is not None}
    state = converted.state_dict()
    assert list(state) == list(expected_state)
    for key, value in expected_state.items():
        assert_bitwise_equal(state[key], value, key)
    assert [n for n, _ in converted.named_parameters()] == [rename(n) for n, _ in model.named_parameters()]
    converted.load_state_dict({k: v.clone() for k, v in expected_state.items()})


@pytest.mark.parametrize("target", TARGETS)
def test_mask_edited_in_place_changes_the_next_output(target):
    model, x = small_pruned("global_unstructured")
    converted = convert(model, target=target)
    scripted = torch.jit.script(converted) if target == "torchscript" else None
    with torch.no_grad():
        before = model(x)
        converted_mask = torch_sparsity.masks(converted)["fc2.weight"]
        converted_mask[:, :6] = False
        model.fc2.weight_mask[:, :6] = 0
        expected = model(x)
        assert not torch.equal(expected, before)
        assert_bitwise_equal(converted(x), expected, "eager")
        if scripted is not None:
            assert_bitwise_equal(scripted(x), expected, "scripted")
        else:
            program = torch.export.export(converted, (x,))
            torch_sparsity.masks(program)["fc2.weight"][:, 6:] = False
            model.fc2.weight_mask[:, 6:] = 0
            assert_bitwise_equal(program.module()(x), model(x), "exported")


@pytest.mark.parametrize("target", TARGETS)
def test_inplace_keeps_the_very_parameters_and_masks(target):
    model, x = small_pruned("several_per_module")
    expected = forward_backward(model, [x])
    rename = renamer(model)
    originals = {fqn: getattr(m, n + "_orig") for fqn, (m, n) in prune_tensors(model).items()}
    masks = prune_masks(model)
    parameters = [(rename(n), id(p)) for n, p in model.named_parameters()]
    assert convert(model, inplace=True, target=target) is model
    assert prune_tensors(model) == {} and not prune.is_pruned(model)
    assert [(n, id(p)) for n, p in model.named_parameters()] == parameters  # the very objects, in the same order
    for fqn, original in originals.items():
        assert model.get_submodule(fqn.rpartition(".")[0]).get_parameter(fqn.rpartition(".")[2] + "_original") is original
        assert torch_sparsity.masks(model)[fqn].data_ptr() == masks[fqn].data_ptr(), fqn  # prune's own tensor
    assert_same_results(forward_backward(model, [x]), expected, rename)


def test_the_callers_model_is_left_alone():
    model, x = small_pruned("several_per_module")
    with torch.no_grad():
        expected = model(x)
    before = module_snapshot(model)
    for target in TARGETS:
        converted = convert(model, target=target)
        assert converted.fc1.weight_original is not model.fc1.weight_orig
    assert_module_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # still pruned by its hooks


def test_both_toolkits_in_one_module():
    torch.manual_seed(0)
    model = Net().eval()
    prepare_with_masks(model, {"fc1.weight": torch.rand(12, 96) > 0.5, "conv.bias": torch.rand(6) > 0.3})
    prune.l1_unstructured(model.fc1, "bias", amount=0.5)
    prune.ln_structured(model.conv, "weight", amount=0.5, n=2, dim=0)
    x = torch.randn(2, 3, 4, 4)
    expected = forward_backward(model, [x])
    for target in TARGETS:
        converted = convert(model, target=target)
        assert sorted(torch_sparsity.masks(converted)) == ["conv.bias", "conv.weight", "fc1.bias", "fc1.weight"]
        assert not parametrize.is_parametrized(converted.fc1) and not prune.is_pruned(converted)
        assert_same_results(forward_backward(converted, [x]), expected, renamer(model))
    scripted = torch.jit.script(convert(model))
    assert_same_results(forward_backward(scripted, [x]), expected, renamer(model))


@pytest.mark.parametrize("target", TARGETS)
def test_other_forward_pre_hooks_stay(target):
    model, x = small_pruned("l1_unstructured")
    calls = []
    handle = model.fc1.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
    # (TorchScript compiles a module's hooks too, and no lambda: not checked here.)
    converted = convert(model, target=target, check_scriptable=False)
    assert list(converted.fc1._forward_pre_hooks) == [handle.id]
    converted(x)
    assert calls == ["Linear"]


def test_multihead_attention_out_proj_reads_its_weight_live():
    """MultiheadAttention reads out_proj.weight without calling out_proj, so
    prune's hook on out_proj never runs: prune's out_proj.weight stays what
    it was when pruned. Converted, it follows weight_original (what prune
    meant; until the weight changes, the two are the same)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    prune.l1_unstructured(mha.out_proj, "weight", amount=0.5)
    x = torch.randn(3, 1, 8)
    converted = convert(mha)
    with torch.no_grad():
        assert torch.equal(converted(x, x, x)[0], mha(x, x, x)[0])
        mha.out_proj.weight_orig.mul_(2)
        converted.out_proj.weight_original.mul_(2)
        stale = mha(x, x, x)[0]
        mha.out_proj(x)  # runs prune's hook: out_proj.weight follows weight_orig now
        fresh = mha(x, x, x)[0]
        assert not torch.equal(stale, fresh)
        assert torch.equal(converted(x, x, x)[0], fresh)


# ------------------------------------------------------ torchvision


TORCHVISION_CASES = (
    [("resnet18", method) for method in NN_UTILS_PRUNE_METHODS]
    + [("mobilenet_v3_small", method) for method in NN_UTILS_PRUNE_METHODS]
    + [("vit_b_16", "ln_structured"), ("vit_b_16", "l1_unstructured")]  # global: 15 s of topk over 86M weights
)


@pytest.mark.parametrize("name, method", TORCHVISION_CASES, ids=lambda p: p)
def test_torchvision_models_converted_and_scripted_bit_for_bit(name, method):
    # vit_b_16 with 32x32 images (4 patches), to keep it quick; one backward
    # of the pruned eager model only: prune's stale out_proj.weight (see
    # test_multihead_attention_out_proj_reads_its_weight_live) holds the graph
    # of the pruning, which a backward frees.
    small = {"input_shape": (1, 3, 32, 32), "image_size": 32} if name == "vit_b_16" else {}
    model, example = pruned_model(name, method, **small)
    rename = renamer(model)
    with mha_slow_path():  # eager MultiheadAttention's fused path differs from TorchScript's in the last bits
        expected = forward_backward(model, [example])
        converted = convert(model)
        scripted = torch.jit.script(converted)
        assert_same_results(forward_backward(scripted, [example]), expected, rename)
        assert_same_results(forward_backward(converted, [example]), expected, rename)
    masks = prune_masks(model)
    found = torch_sparsity.masks(scripted)
    assert found.keys() == masks.keys() and len(found) > 10
    for fqn, mask in masks.items():
        assert found[fqn].dtype == torch.bool and torch.equal(found[fqn], mask != 0), fqn


def test_a_prune_mask_the_plugin_could_not_hold_is_converted_as_prune_reads_it():
    """prune reads its mask as mask.to(orig.dtype): an int32 mask works there,
    and converts to that (the plugin takes no int32 mask)."""
    model, x = small_pruned("l1_unstructured")
    model.fc1.weight_mask = model.fc1.weight_mask.int()
    for compact in (True, False):
        converted = convert(model, compact_masks=compact)
        assert converted.fc1.weight_sparsity.mask.dtype == (torch.bool if compact else torch.float32)
        with torch.no_grad():
            assert_bitwise_equal(converted(x), model(x), "output")
