"""Tied and shared weights: a Parameter shared by two modules (a language
model's tied embeddings), pruned on either side or both, and a submodule
reached by two paths. Each pruned tensor has one name everywhere (the first
path in named_modules() order): masks of the eager, scripted and exported
model, an AOTInductor package's mask_names (Python and sparsity_run); each
module that prunes a tied tensor has a mask of its own, and editing it changes
that layer alone, as in the pruned eager model."""

import io
import re

import pytest
import torch

import torch_sparsity
from end_to_end_models import (
    PRUNING_SOURCES,
    SharedLinearModel,
    TiedLanguageModel,
    prune_tensors,
    sparsity_run,
    tied_weights_input,
)
from sparsity_testing import assert_bitwise_equal, relative_diff
from torch_sparsity import aoti
from torch_sparsity.convert import convert, squash
from torch_sparsity.sources import source_masks

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")]

# (model, tensors pruned, the names they go by)
CASES = {
    "tied_both": (TiedLanguageModel, ["emb.weight", "head.weight"], ["emb.weight", "head.weight"]),
    "tied_emb": (TiedLanguageModel, ["emb.weight"], ["emb.weight"]),
    "tied_head": (TiedLanguageModel, ["head.weight"], ["head.weight"]),
    "shared": (SharedLinearModel, ["a.weight", "out.weight"], ["a.weight", "out.weight"]),
    "shared_pruned_as_b": (SharedLinearModel, ["b.weight"], ["a.weight"]),
}


def pruned(case, source, device="cpu"):
    """The pruned eager model of `case`, its input and the names of its pruned tensors."""
    make, fqns, names = CASES[case]
    torch.manual_seed(0)
    model = prune_tensors(make().eval(), fqns, source).to(device)
    return model, tied_weights_input(model).to(device), names


def exported(converted, x, strict=False):
    """The program of `converted`, and the same program saved and loaded."""
    program = torch.export.export(converted, (x,), strict=strict)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return program, torch.export.load(buffer)


def new_mask(like):
    """A random mask of `like`'s shape, dtype and device."""
    return (torch.rand(like.shape) > 0.3).to(like.dtype).to(like.device)


@pytest.mark.parametrize("source", PRUNING_SOURCES)
@pytest.mark.parametrize("case", CASES)
def test_one_name_per_pruned_tensor_everywhere(case, source):
    eager, x, names = pruned(case, source)
    assert sorted(source_masks(eager)) == names
    scripted = torch.jit.script(convert(eager))
    converted = convert(eager, target="export")
    programs = exported(converted, x)
    with torch.no_grad():  # the FakeSparsity objects export for inference
        programs += (torch.export.export(convert(eager), (x,), strict=False),)
    if not case.startswith("shared"):
        # Strict export keeps one name of a buffer reached by several paths,
        # the last: a shared submodule's mask is named so there.
        programs += exported(converted, x, strict=True)
    for model in (convert(eager), scripted, converted) + programs:
        found = torch_sparsity.masks(model)
        assert sorted(found) == names, type(model).__name__
        for fqn in names:
            assert torch.equal(found[fqn].bool(), source_masks(eager)[fqn].bool()), fqn


@pytest.mark.parametrize("source", PRUNING_SOURCES)
@pytest.mark.parametrize("case", CASES)
def test_each_mask_changes_its_own_layer_alone(case, source, device):
    """The same new mask written into the pruned eager model and into each
    converted form gives the same outputs, bit for bit."""
    for fqn in CASES[case][2]:
        eager, x, _ = pruned(case, source, device)
        converted = convert(eager, target="export")
        scripted = torch.jit.script(convert(eager))
        programs = exported(converted, x)
        models = (converted, scripted) + programs
        with torch.no_grad():
            before = eager(x)
            mask = new_mask(source_masks(eager)[fqn])
            source_masks(eager)[fqn].copy_(mask)
            expected = eager(x)
            assert not torch.equal(expected, before), fqn  # the edit shows
            for model in models:
                torch_sparsity.masks(model)[fqn].copy_(mask)
            for model in models:
                run = model.module() if isinstance(model, torch.export.ExportedProgram) else model
                assert_bitwise_equal(run(x), expected, f"{fqn}: {type(model).__name__}")


def test_strict_export_names_a_shared_mask_by_the_last_path():
    """Strict export keeps only the last path of a buffer reached by several
    (documented in docs/end_to_end.md); the mask stays live there."""
    eager, x, _ = pruned("shared", "ao_pruning")
    program = torch.export.export(convert(eager, target="export"), (x,), strict=True)
    assert sorted(torch_sparsity.masks(program)) == ["b.weight", "out.weight"]
    mask = source_masks(eager)["a.weight"]
    with torch.no_grad():
        mask.copy_(new_mask(mask))
        torch_sparsity.masks(program)["b.weight"].copy_(mask)
        assert_bitwise_equal(program.module()(x), eager(x))


@pytest.mark.parametrize("target", ["torchscript", "export"])
@pytest.mark.parametrize("case", ["tied_both", "tied_emb", "tied_head"])
def test_squash_refuses_a_tied_pruned_tensor(case, target):
    """One product cannot stand for a tensor read under two masks, or under
    one mask and none; nothing changes."""
    eager, x, _ = pruned(case, "ao_pruning")
    models = [convert(eager, target=target)]
    if target == "torchscript":
        models.append(torch.jit.script(convert(eager)))
    for model in models:
        with torch.no_grad():
            before = model(x)
        found = {fqn: mask.clone() for fqn, mask in torch_sparsity.masks(model).items()}
        with pytest.raises(RuntimeError, match=r"squash: emb\.weight and head\.weight are one tensor \(tied\)"):
            squash(model)
        assert torch_sparsity.masks(model).keys() == found.keys()
        for fqn, mask in torch_sparsity.masks(model).items():
            assert torch.equal(mask, found[fqn]), fqn
        with torch.no_grad():
            assert_bitwise_equal(model(x), before)


def test_squash_of_a_scripted_shared_module_applies_its_mask_once():
    """A scripted model holds a shared module under each path: squash
    multiplies its mask in once (a mask of 0.5s shows a second time)."""
    eager, x, _ = pruned("shared", "nn_utils_prune")
    with torch.no_grad():
        eager.a.weight_mask.mul_(0.5)
        expected = eager(x)
    scripted = torch.jit.script(convert(eager, compact_masks=False))
    squash(scripted)
    assert torch_sparsity.masks(scripted) == {}
    with torch.no_grad():
        assert_bitwise_equal(scripted(x), expected)


class TiedWithinModule(torch.nn.Module):
    """One Parameter under two names of one module."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(4, 4))
        self.b = self.a

    def forward(self, x):
        return x @ self.a + x @ self.b


@pytest.mark.parametrize("source", PRUNING_SOURCES)
@pytest.mark.parametrize("target", ["torchscript", "export"])
@pytest.mark.parametrize("names", [["a", "b"], ["a"]], ids=["both", "one"])
def test_a_tensor_tied_within_a_module(names, target, source):
    """Each pruned name of the tensor has its mask in masks(), and squash
    refuses (one product cannot stand for both names' reads), changing
    nothing."""
    torch.manual_seed(0)
    eager = prune_tensors(TiedWithinModule(), names, source)
    x = torch.randn(2, 4)
    models = [convert(eager, target=target)]
    if target == "torchscript":
        models.append(torch.jit.script(convert(eager)))
    for model in models:
        assert sorted(torch_sparsity.masks(model)) == names
        found = {fqn: mask.clone() for fqn, mask in torch_sparsity.masks(model).items()}
        with torch.no_grad():
            before = model(x)
            assert_bitwise_equal(before, eager(x))
        with pytest.raises(RuntimeError, match=r"squash: a and b are one tensor \(tied\)"):
            squash(model)
        for fqn, mask in torch_sparsity.masks(model).items():
            assert torch.equal(mask, found[fqn]), fqn
        with torch.no_grad():
            assert_bitwise_equal(model(x), before)


# ------------------------------------------------ AOTInductor packages


# (case, pruning source) compiled once each: every compile takes seconds.
PACKAGES = [
    ("tied_both", "nn_utils_prune"),
    ("tied_emb", "ao_pruning"),  # the tie pruned on one side
    ("shared", "ao_pruning"),
]


@pytest.fixture(scope="module", params=PACKAGES, ids=["-".join(p) for p in PACKAGES])
def package(request, tmp_path_factory):
    """A compiled package of a pruned model, with its eager model and input
    (saved for sparsity_run too)."""
    case, source = request.param
    eager, x, names = pruned(case, source)
    folder = tmp_path_factory.mktemp("tied_package")
    path = aoti.compile(convert(eager, target="export"), (x,), folder / "model.pt2")
    torch.save(x, folder / "input.pt")
    return path, folder, eager, x, names


def test_package_names_and_masks(package):
    path, _, eager, _, names = package
    runner = aoti.load(path)
    assert runner.mask_names() == names
    for fqn in names:
        assert torch.equal(runner.mask(fqn).bool(), source_masks(eager)[fqn].bool()), fqn


def test_package_set_mask_changes_that_layer_alone(package):
    path, _, eager, x, names = package
    runner = aoti.load(path)
    for fqn in names:
        held, source = runner.mask(fqn), source_masks(eager)[fqn]
        saved = source.clone()
        try:
            with torch.no_grad():
                source.copy_(new_mask(source))
                expected = eager(x)
            runner.set_mask(fqn, source.to(held.dtype))
            assert relative_diff(runner(x), expected) <= 1e-6, fqn
        finally:
            source.copy_(saved)
            runner.set_mask(fqn, held)


def test_sparsity_run_lists_and_sets_each_mask(package):
    path, folder, eager, x, names = package
    out = sparsity_run(path).stdout
    assert f"pruned tensors: {len(names)}\n" in out, out
    assert re.findall(r"^  (\S+) +\[", out, re.M) == names, out
    for fqn in names:
        source = source_masks(eager)[fqn]
        saved = source.clone()
        try:
            with torch.no_grad():
                source.copy_(new_mask(source))
                torch.save(eager(x), folder / "expected.pt")
            torch.save(source.clone(), folder / "mask.pt")
        finally:
            source.copy_(saved)
        result = sparsity_run(path, "--set-mask", f"{fqn}={folder / 'mask.pt'}", "--input", folder / "input.pt",
                              "--expect", folder / "expected.pt", "--atol", 1e-5, "--runs", 1)
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(rf"set the mask of {re.escape(fqn)} from ", result.stdout), result.stdout


def test_sparsity_run_prunes_a_tied_tensor_by_its_values(package):
    """--prune reads the tensor each mask applies to: compiled under one of
    the tie's names, which the package records."""
    path, _, _, _, names = package
    result = sparsity_run(path, "--prune", 0.75)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"re-pruned {len(names)} tensors by magnitude to sparsity 0.75" in result.stdout, result.stdout


def test_sparsity_run_names_a_scripted_shared_module_once(tmp_path):
    eager, x, names = pruned("shared", "nn_utils_prune")
    with torch.no_grad():
        eager.a.weight_mask.mul_(0.5)  # a second multiplication would show
        expected = eager(x)
    torch.jit.script(convert(eager, compact_masks=False)).save(str(tmp_path / "model.pt"))
    torch.save(x, tmp_path / "input.pt")
    torch.save(expected, tmp_path / "expected.pt")
    result = sparsity_run(tmp_path / "model.pt", "--input", tmp_path / "input.pt", "--expect",
                          tmp_path / "expected.pt", "--atol", 0, "--runs", 1, "--squash")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.findall(r"^  (\S+) +\[", result.stdout, re.M) == names, result.stdout
    assert f"squashed {len(names)} masks" in result.stdout
    assert "max |output - output before squashing| = 0.000e+00" in result.stdout, result.stdout


@pytest.mark.parametrize("case", ["tied_both", "tied_emb"])
def test_sparsity_run_squash_refuses_a_tied_pruned_tensor(case, tmp_path):
    eager, _, _ = pruned(case, "ao_pruning")
    torch.jit.script(convert(eager)).save(str(tmp_path / "model.pt"))
    result = sparsity_run(tmp_path / "model.pt", "--squash", "--save", tmp_path / "squashed.pt")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--squash: the tensor of emb.weight is tied to another module's" in result.stderr, result.stderr
    assert not (tmp_path / "squashed.pt").exists()
