"""A shrunk model goes every way a pruned model goes: converted (both
targets), scripted, saved, loaded and run from C++ (sparsity_run), exported
strict and non-strict, compiled into an AOTInductor package run from Python
and C++, with set_mask on the mask that remains (conv2's unstructured one,
sliced to the kept channels). Outputs equal the masked model's within 1e-5
of the output's scale (summation order; AOTInductor's own kernels)."""

import pytest
import torch

import torch_sparsity
from end_to_end_models import sparsity_run
from shrink_models import masked_small_cnn
from sparsity_testing import relative_diff
from torch_sparsity import aoti
from torch_sparsity.convert import convert, fake_sparsities

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")]

RTOL = 1e-5
REMAINING = "conv2.weight"


@pytest.fixture(scope="module")
def shrunk():
    """(masked model, input, its output, the shrunk model)."""
    masked, example, _ = masked_small_cnn()
    model = torch_sparsity.shrink(masked, (example,))
    with torch.no_grad():
        expected = masked(example)
    return masked, example, expected, model


@pytest.fixture(scope="module")
def package(shrunk, tmp_path_factory):
    """The shrunk model converted with target="export", its AOTInductor
    package, and the files sparsity_run reads."""
    _, example, expected, model = shrunk
    folder = tmp_path_factory.mktemp("shrink_paths")
    exportable = convert(model, target="export")
    path = aoti.compile(exportable, (example,), folder / "shrunk.pt2")
    torch.save(example, folder / "input.pt")
    torch.save(expected, folder / "expected.pt")
    return exportable, path, folder


def new_remaining_mask(model) -> torch.Tensor:
    """Another mask for the remaining pruned tensor: a third of its entries."""
    return torch.rand(model.conv2.weight_mask.shape, generator=torch.Generator().manual_seed(5)) > 0.66


def run_ok(*args):
    result = sparsity_run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_shrunk_model_is_smaller_and_keeps_its_mask(shrunk):
    masked, _, _, model = shrunk
    assert model.conv1.out_channels == model.bn1.num_features == model.conv2.in_channels == 6
    assert masked.conv1.out_channels == 12
    assert model.conv2.weight_mask.shape == (8, 6, 3, 3) and not model.conv2.weight_mask.all()


def test_scripted_saved_loaded_and_run_from_cpp(shrunk, tmp_path):
    masked, example, expected, model = shrunk
    scripted = torch.jit.script(convert(model))
    assert REMAINING in fake_sparsities(scripted)
    scripted.save(str(tmp_path / "shrunk.pt"))
    loaded = torch.jit.load(str(tmp_path / "shrunk.pt"))
    with torch.no_grad():
        assert relative_diff(loaded(example), expected) <= RTOL
    torch.save(example, tmp_path / "input.pt")
    torch.save(expected, tmp_path / "expected.pt")
    atol = RTOL * expected.abs().max().item()
    out = run_ok(tmp_path / "shrunk.pt", "--input", tmp_path / "input.pt", "--expect", tmp_path / "expected.pt",
                 "--atol", atol, "--runs", 1)
    assert "output [2, 5] for input [2, 3, 16, 16]" in out


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_exported(shrunk, package, strict):
    _, example, expected, _ = shrunk
    exportable = package[0]
    program = torch.export.export(exportable, (example,), strict=strict)
    assert REMAINING in torch_sparsity.masks(program)
    with torch.no_grad():
        assert relative_diff(exportable(example), expected) <= RTOL
        assert relative_diff(program.module()(example), expected) <= RTOL


def test_package_runs_and_follows_set_mask_from_python(shrunk, package):
    _, example, expected, model = shrunk
    exportable, path, _ = package
    runner = aoti.load(path)
    assert REMAINING in runner.mask_names()
    with torch.no_grad():
        assert relative_diff(runner(example), expected) <= RTOL
        new_mask = new_remaining_mask(model)
        runner.set_mask(REMAINING, new_mask)
        saved = model.conv2.weight_mask.clone()
        model.conv2.weight_mask.copy_(new_mask)
        try:
            changed = model(example)  # the prune hook recomputes the weight
        finally:
            model.conv2.weight_mask.copy_(saved)
        assert relative_diff(changed, expected) > 100 * RTOL  # the mask matters
        assert relative_diff(runner(example), changed) <= RTOL


def test_package_runs_and_follows_set_mask_from_cpp(shrunk, package):
    _, example, expected, model = shrunk
    _, path, folder = package
    atol = RTOL * expected.abs().max().item()
    out = run_ok(path, "--input", folder / "input.pt", "--expect", folder / "expected.pt", "--atol", atol, "--runs", 1)
    assert REMAINING in out
    new_mask = new_remaining_mask(model)
    torch.save(new_mask, folder / "mask.pt")
    saved = model.conv2.weight_mask.clone()
    model.conv2.weight_mask.copy_(new_mask)
    try:
        with torch.no_grad():
            torch.save(model(example), folder / "changed.pt")
    finally:
        model.conv2.weight_mask.copy_(saved)
    out = run_ok(path, "--set-mask", f"{REMAINING}={folder / 'mask.pt'}", "--input", folder / "input.pt",
                 "--expect", folder / "changed.pt", "--atol", atol, "--runs", 1)
    assert f"set the mask of {REMAINING}" in out
