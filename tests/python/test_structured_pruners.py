"""convert() on models pruned by torch.ao.pruning's structured pruners
(SaliencyPruner, FPGMPruner: FakeStructuredSparsity row masks and BiasHook),
both targets, against the eager pruned model in the same process: outputs
and gradients bit for bit (eager, scripted, exported), live masks in every
form (AOTInductor packages and sparsity_run included), squash, refusals."""

import copy
import re
import subprocess

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.pruner.parametrization import BiasHook, FakeStructuredSparsity
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize

import torch_sparsity
from end_to_end_models import STRUCTURED_PRUNER_METHODS, forward_backward, mha_slow_path, prune_structured, pruned_model
from sparsity_testing import assert_bitwise_equal, assert_same_results, save_tensor_bag
from torch_sparsity import aoti
from torch_sparsity.convert import ConversionError, convert, masks, squash
from torch_sparsity.utils import module_contains_param

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The default weight initialization of:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),  # bit-for-bit gradients (conftest.py)
]

TARGETS = ["torchscript", "export"]


class Net(nn.Module):
    """Conv2d and Linears with biases, and a Linear without."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc1 = nn.Linear(8 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def small_pruned(method):
    torch.manual_seed(0)
    model = Net()
    prune_structured(model, method)
    return model, torch.randn(2, 3, 6, 6)


def structured_masks(model):
    return {
        f"{fqn}.{name}": plist[0].mask
        for fqn, m in model.named_modules() if parametrize.is_parametrized(m)
        for name, plist in m.parametrizations.items()
    }


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", STRUCTURED_PRUNER_METHODS)
def test_eager_output_and_gradients_bit_for_bit(method, target):
    model, x = small_pruned(method)
    converted = convert(model, target=target)
    expected = forward_backward(model, (x,))
    assert_same_results(forward_backward(converted, (x,)), expected)
    # The masks are the pruner's, as row masks, and not in the state dict.
    found = masks(converted)
    assert found.keys() == structured_masks(model).keys()
    for fqn, mask in structured_masks(model).items():
        assert torch.equal(found[fqn], mask) and found[fqn].dim() == 1, fqn
    assert not any(k.endswith(("_mask", ".mask")) for k in converted.state_dict())
    # After the eager forward (BiasHook zeroed the pruned rows of _bias with
    # prune_bias), both state dicts hold the same values.
    eager_state = {k.replace("parametrizations.weight.original", "weight_original"): v
                   for k, v in model.state_dict().items()}
    assert eager_state.keys() == converted.state_dict().keys()
    for k, v in converted.state_dict().items():
        assert_bitwise_equal(v, eager_state[k], k)
    if method == "saliency":
        pruned_rows = ~structured_masks(model)["fc1.weight"]
        assert pruned_rows.any() and (converted.fc1._bias[pruned_rows] == 0).all()


@pytest.mark.parametrize("form", ["scripted", "exported-strict", "exported-non-strict", "exported-saved"])
@pytest.mark.parametrize("method", STRUCTURED_PRUNER_METHODS)
def test_scripted_and_exported_outputs_bit_for_bit(method, form, tmp_path):
    model, x = small_pruned(method)
    with torch.no_grad():
        expected = model(x)
    if form == "scripted":
        run = torch.jit.script(convert(model))
    else:
        program = torch.export.export(convert(model, target="export"), (x,), strict=form == "exported-strict")
        if form == "exported-saved":
            torch.export.save(program, tmp_path / "p.pt2")
            program = torch.export.load(tmp_path / "p.pt2")
        assert set(masks(program)) == set(structured_masks(model))
        run = program.module()
    with torch.no_grad():
        assert_bitwise_equal(run(x), expected)


@pytest.mark.parametrize("target, form", [
    ("torchscript", "eager"), ("torchscript", "scripted"), ("export", "eager"), ("export", "exported"),
])
def test_a_mask_edited_in_place_changes_the_next_output(target, form):
    model, x = small_pruned("saliency")
    with torch.no_grad():
        model(x)  # BiasHook zeroes the pruned rows of _bias for good; convert does the same
    converted = convert(model, target=target)
    if form == "eager":
        runnable, live = converted, masks(converted)
    elif form == "scripted":
        runnable = torch.jit.script(converted)
        live = masks(runnable)
    else:
        program = torch.export.export(converted, (x,))
        runnable, live = program.module(), masks(program)
    with torch.no_grad():
        before = runnable(x)
        live["fc1.weight"].fill_(True)
        after = runnable(x)
        structured_masks(model)["fc1.weight"].fill_(True)
        expected = model(x)
    assert not torch.equal(before, after)
    assert_bitwise_equal(after, expected)


@pytest.mark.parametrize("target", TARGETS)
def test_squash_gives_the_same_outputs_and_no_masks(target):
    model, x = small_pruned("saliency")
    converted = convert(model, target=target)
    with torch.no_grad():
        expected = converted(x)
        squashed = squash(copy.deepcopy(converted) if target == "export" else torch.jit.script(converted))
        assert masks(squashed) == {}
        assert_bitwise_equal(squashed(x), expected)


@pytest.mark.parametrize("name, method", [
    ("resnet18", "saliency"), ("mobilenet_v3_small", "saliency"), ("mobilenet_v3_small", "fpgm_keep_bias"),
    ("vit_b_16", "saliency"),
], ids=lambda p: p)
def test_torchvision_models_converted_and_scripted_bit_for_bit(name, method):
    kwargs = {"input_shape": (1, 3, 32, 32), "image_size": 32} if name == "vit_b_16" else {}
    model, x = pruned_model(name, method, **kwargs)
    assert any(isinstance(h, BiasHook) for m in model.modules() for h in m._forward_hooks.values())
    with mha_slow_path():
        expected = forward_backward(model, (x,))
        for target in TARGETS:
            assert_same_results(forward_backward(convert(model, target=target), (x,)), expected)
        assert_same_results(forward_backward(torch.jit.script(convert(model)), (x,)), expected)


def test_aoti_package_masks_are_row_masks_that_set_mask_replaces(tmp_path):
    model, x = small_pruned("saliency")
    model.eval()
    converted = convert(model, target="export")
    with torch.no_grad():
        expected = converted(x)
    runner = aoti.load(aoti.compile(converted, (x,), tmp_path / "rows.pt2"))
    assert runner.mask_names() == sorted(structured_masks(model))
    scale = expected.abs().max().item()
    assert (runner(x) - expected).abs().max().item() <= 1e-5 * scale
    every_row = torch.ones_like(runner.mask("fc1.weight"))
    runner.set_mask("fc1.weight", every_row)
    masks(converted)["fc1.weight"].copy_(every_row)
    with torch.no_grad():
        changed = converted(x)
    assert not torch.equal(changed, expected)
    assert (runner(x) - changed).abs().max().item() <= 1e-5 * scale
    with pytest.raises(RuntimeError, match=r"has shape \[6\], got \[6, 128\]"):
        runner.set_mask("fc1.weight", torch.ones(6, 128, dtype=torch.bool))


def test_sparsity_run_lists_prunes_rows_and_squashes(tmp_path):
    model, x = small_pruned("saliency")
    model.eval()
    scripted = torch.jit.script(convert(model))
    scripted.save(str(tmp_path / "rows.pt"))
    with torch.no_grad():
        expected = model(x)
    save_tensor_bag(tmp_path / "io.pt", {"input": x, "output": expected})
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "y.pt")
    run = [torch_sparsity.sparsity_run_path(), str(tmp_path / "rows.pt"), "--input", str(tmp_path / "x.pt"),
           "--expect", str(tmp_path / "y.pt"), "--atol", "0"]
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"fc1\.weight\s+\[6, 128\]\s+bool\s+0\.500", out.stdout), out.stdout
    assert "max |output - expected| = 0" in out.stdout
    # --prune on a row mask prunes whole rows: those of smallest L1 norm.
    out = subprocess.run(run[:2] + ["--prune", "0.5", "--save", str(tmp_path / "pruned.pt")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    repruned = torch.jit.load(str(tmp_path / "pruned.pt"))
    weight = repruned.fc1.weight_original.detach()
    mask = repruned.fc1.weight_sparsity.mask
    assert mask.shape == (6,) and int((~mask).sum()) == 3
    norms = weight.abs().sum(1)
    assert norms[~mask].max() <= norms[mask].min()
    # --squash multiplies the rows in and drops the objects.
    out = subprocess.run(run[:2] + ["--squash", "--save", str(tmp_path / "squashed.pt"), "--input",
                                    str(tmp_path / "x.pt"), "--expect", str(tmp_path / "y.pt"), "--atol", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    squashed = torch.jit.load(str(tmp_path / "squashed.pt"))
    assert squashed.fc1.weight_sparsity is None
    with torch.no_grad():
        assert_bitwise_equal(squashed(x), expected)
    # Re-pruned and squashed in one call: the bias rows the new masks prune
    # are zeroed in _bias (prune_bias), as the hook would have left them.
    for name, extra in [("more.pt", []), ("both.pt", ["--squash"])]:
        out = subprocess.run(run[:2] + ["--prune", "0.75", *extra, "--save", str(tmp_path / name)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    more, both = torch.jit.load(str(tmp_path / "more.pt")), torch.jit.load(str(tmp_path / "both.pt"))
    more_mask = more.fc1.weight_sparsity.mask
    assert int((~more_mask).sum()) == 5 and (~more_mask & mask).any()  # rows the first masks kept
    with torch.no_grad():
        assert_bitwise_equal(both(x), more(x))
    assert (both.fc1._bias[~more_mask] == 0).all()


# ---------------------------------------------------------------- refusals


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        fqn: (type(m), dict(m._forward_hooks), dict(m._forward_pre_hooks)) for fqn, m in model.named_modules()
    }


class DoublingRows(FakeStructuredSparsity):
    def forward(self, x):
        return 2 * super().forward(x)


def _refusals():
    def both_kinds_on_one_tensor():
        model, _ = small_pruned("saliency")
        parametrize.register_parametrization(model.fc1, "weight", FakeSparsity(torch.ones(6, 128)))
        return model, r"module 'fc1' \(Linear\): tensor 'weight' has the parametrizations " \
                      r"\['FakeStructuredSparsity', 'FakeSparsity'\]"

    def overridden_forward():
        model = Net()
        parametrize.register_parametrization(model.fc1, "weight", DoublingRows(torch.ones(6, dtype=torch.bool)))
        return model, r"module 'fc1' \(Linear\): tensor 'weight' has a DoublingRows parametrization that overrides"

    def bias_hook_without_parametrization():
        model = Net()
        model.fc1.register_forward_hook(BiasHook(FakeStructuredSparsity(torch.ones(6, dtype=torch.bool)), True))
        return model, r"module 'fc1' \(Linear\): has a torch.ao.pruning BiasHook but no FakeStructuredSparsity"

    def row_mask_of_the_wrong_length():
        model = Net()
        parametrize.register_parametrization(model.fc1, "weight", FakeStructuredSparsity(torch.ones(6)),
                                             unsafe=True)
        model.fc1.parametrizations.weight[0].mask = torch.ones(5)
        return model, r"module 'fc1' \(Linear\): the row mask of tensor 'weight' has shape \(5,\)"

    return {"both kinds on one tensor": both_kinds_on_one_tensor, "overridden forward": overridden_forward,
            "BiasHook without a parametrization": bias_hook_without_parametrization,
            "row mask of the wrong length": row_mask_of_the_wrong_length}


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "copy"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", list(_refusals()))
def test_refusals_name_module_and_tensor_and_change_nothing(case, target, inplace):
    model, message = _refusals()[case]()
    tensors, hooks = _state(model)
    with pytest.raises(ConversionError, match=message):
        convert(model, inplace=inplace, target=target)
    after_tensors, after_hooks = _state(model)
    assert after_hooks == hooks
    assert after_tensors.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(after_tensors[k], tensors[k]), k


def test_module_contains_param_sees_structured_sparsity():
    model, _ = small_pruned("saliency")
    scripted = torch.jit.script(convert(model))
    assert module_contains_param(scripted.fc1, "FakeStructuredSparsity")
    assert not module_contains_param(scripted.fc1, "FakeSparsity")
    assert torch.ops.sparsity.module_contains_param(scripted.conv._c, "FakeStructuredSparsity")
    # torch.jit.trace keeps parametrize's layout, which the operator reads too.
    traced = torch.jit.trace(model, torch.randn(2, 3, 6, 6), check_trace=False)
    assert module_contains_param(traced.fc1, "FakeStructuredSparsity")


def test_a_row_pruned_then_kept_again_keeps_a_zero_bias_as_biashook_does():
    """BiasHook writes the zeros into _bias; the TorchScript target's hook
    too (the export target's only selects: docs/end_to_end.md)."""
    model, x = small_pruned("saliency")
    scripted = torch.jit.script(convert(model))
    eager_mask, live = structured_masks(model)["fc1.weight"], masks(scripted)["fc1.weight"]
    kept = int(eager_mask.nonzero()[0])
    with torch.no_grad():
        for mask in (eager_mask, live):
            mask[kept] = False
        assert_bitwise_equal(scripted(x), model(x))
        for mask in (eager_mask, live):
            mask[kept] = True
        assert_bitwise_equal(scripted(x), model(x))
    assert scripted.fc1._bias[kept] == 0 and model.fc1._bias[kept] == 0


@pytest.mark.parametrize("target", ["torchscript", "export"])
def test_compiling_with_a_bias_hook_after_the_same_layers_without_one(target):
    # torch.compile does not guard on hooks: a converted layer with the bias
    # hook must not reuse the code compiled for the same layer without it.
    def pruned(bias):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 6 * 6, 10, bias=bias))
        prune_structured(model, "saliency")
        return model.eval()

    x = torch.randn(2, 3, 6, 6)
    torch._dynamo.reset()
    with torch.no_grad():
        for bias in (False, True):
            eager = pruned(bias)
            compiled = torch.compile(convert(eager, target=target))
            torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)
