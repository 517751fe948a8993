"""The C++ program sparsity_run (tools/sparsity_run.cpp), run on models that
torch_sparsity.convert wrote: every option, and bad arguments."""

import re

import pytest
import torch
from torch import nn

from end_to_end_models import sparsity_run
from sparsity_testing import sparsify_with_plugin
from torch_sparsity import utils as sparsity_utils
from torch_sparsity.convert import convert, fake_sparsities
from torch_sparsity.sparsifiers import prepare_with_masks

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")]

MASK_DTYPES = {"0.weight": torch.float32, "1.weight": torch.bool, "4.weight": torch.bool}


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pruned small CNN, converted and saved; its input and eager output."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sparsity_run")
    eager = small_cnn().eval()
    masks = {fqn: (torch.rand(getattr(eager.get_submodule(fqn[:-7]), "weight").shape) > 0.4).to(dtype)
             for fqn, dtype in MASK_DTYPES.items()}
    prepare_with_masks(eager, masks)
    # Masks kept in their dtypes, so that the listing shows each kind.
    scripted = torch.jit.script(convert(eager, compact_masks=False))
    example = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = eager(example)
    paths = {name: folder / f"{name}.pt" for name in ["model", "input", "expected", "garbage", "dict", "wrong_shape"]}
    scripted.save(str(paths["model"]))
    torch.save(example, paths["input"])
    torch.save(expected, paths["expected"])
    paths["garbage"].write_bytes(b"not a torch file")
    torch.save({"mask": torch.ones(3)}, paths["dict"])
    torch.save(torch.ones(3, 3), paths["wrong_shape"])
    return paths, eager, example, expected


def run_ok(*args):
    result = sparsity_run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_help():
    out = run_ok("--help")
    assert out.startswith("usage: sparsity_run MODEL.pt|PACKAGE.pt2")
    for option in ["--set-mask", "--prune", "--squash", "--input", "--shape", "--runs", "--expect", "--atol",
                   "--output", "--save"]:
        assert option in out


def test_lists_fqn_shape_dtype_and_sparsity(files):
    paths, eager, _, _ = files
    out = run_ok(paths["model"])
    assert "pruned tensors: 3\n" in out
    for fqn, dtype in MASK_DTYPES.items():
        module = eager.get_submodule(fqn.rpartition(".")[0])
        mask = module.parametrizations.weight[0].mask
        level = (mask == 0).float().mean().item()
        shape = "[" + ", ".join(str(s) for s in mask.shape) + "]"
        line = re.search(rf"^  {re.escape(fqn)} +(\S.*?) +(\S+) +(\S+)$", out, re.M)
        assert line, out
        assert line.groups() == (shape, str(dtype).replace("torch.", ""), f"{level:.3f}")
    mask_bytes = sum(m.parametrizations.weight[0].mask.nbytes for m in eager.modules() if hasattr(m, "parametrizations"))
    assert f"  the masks take {mask_bytes / 2**20:.1f} MiB\n" in out
    assert "output" not in out  # no input, no inference


def test_runs_times_compares_and_saves_the_output(files, tmp_path):
    paths, _, _, expected = files
    out = run_ok(paths["model"], "--input", paths["input"], "--expect", paths["expected"], "--atol", "0",
                 "--runs", "3", "--output", tmp_path / "out.pt")
    assert "output [2, 5] for input [2, 3, 6, 6]" in out
    assert "max |output - expected| = 0.000e+00" in out
    assert re.search(r"median inference time over 3 runs: \d+\.\d+ ms", out)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_tolerance_exceeded_fails(files, tmp_path):
    paths, _, _, expected = files
    torch.save(expected + 0.5, tmp_path / "off.pt")
    result = sparsity_run(paths["model"], "--input", paths["input"], "--expect", tmp_path / "off.pt", "--atol", "0.1",
                          "--runs", "1")
    assert result.returncode == 1
    assert "max |output - expected| = 5.000e-01" in result.stdout and "FAILED: beyond --atol 0.1" in result.stdout


def test_generated_input_follows_the_seed(files, tmp_path):
    paths = files[0]
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        out = run_ok(paths["model"], "--shape", "4,3,6,6", "--seed", seed, "--runs", "1", "--output", tmp_path / f"{name}.pt")
        assert "output [4, 5] for input [4, 3, 6, 6]" in out
    a, b, c = (torch.load(tmp_path / f"{name}.pt") for name in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_set_mask_from_a_file(files, tmp_path):
    paths, eager, example, _ = files
    new_mask = torch.rand(8, 3, 3, 3) > 0.8  # bool, into a float32 mask
    torch.save(new_mask, tmp_path / "mask.pt")
    out = run_ok(paths["model"], "--set-mask", f"0.weight={tmp_path / 'mask.pt'}", "--save", tmp_path / "new.pt")
    before = (eager[0].parametrizations.weight[0].mask == 0).float().mean().item()
    after = (new_mask == 0).float().mean().item()
    assert f"set the mask of 0.weight from {tmp_path / 'mask.pt'}: sparsity {before:.3f} -> {after:.3f}" in out
    loaded = torch.jit.load(str(tmp_path / "new.pt"))
    mask = fake_sparsities(loaded)["0.weight"].mask
    assert mask.dtype == torch.float32 and torch.equal(mask, new_mask.float())
    assert torch.equal(fake_sparsities(loaded)["4.weight"].mask, eager[4].parametrizations.weight[0].mask)
    eager_mask = eager[0].parametrizations.weight[0].mask
    saved = eager_mask.clone()
    try:
        eager_mask.copy_(new_mask)
        with torch.no_grad():
            assert torch.equal(loaded(example), eager(example))
    finally:
        eager_mask.copy_(saved)


def test_prune_by_magnitude(files, tmp_path):
    paths = files[0]
    out = run_ok(paths["model"], "--prune", "0.75", "--save", tmp_path / "pruned.pt")
    assert "re-pruned 3 tensors by magnitude to sparsity 0.75" in out
    loaded = torch.jit.load(str(tmp_path / "pruned.pt"))
    for fqn, sparsity in fake_sparsities(loaded).items():
        mask = sparsity.mask
        assert mask.dtype == MASK_DTYPES[fqn], fqn
        assert re.search(rf"^  {re.escape(fqn)} .* 0\.750$", out, re.M)
        magnitude = sparsity_utils.fqn_to_module(loaded, fqn + "_original").detach().abs()
        zeroed = mask == 0
        assert zeroed.sum().item() == round(0.75 * mask.numel()), fqn
        assert magnitude[zeroed].max() <= magnitude[~zeroed].min(), fqn  # the smallest |w| went


def test_squash_leaves_no_masks(files, tmp_path):
    paths, _, example, expected = files
    out = run_ok(paths["model"], "--input", paths["input"], "--runs", "2", "--squash", "--save", tmp_path / "squashed.pt")
    assert "squashed 3 masks into their tensors; the model holds no masks now" in out
    assert re.search(r"squashed model: max \|output - output before squashing\| = 0\.000e\+00, median inference "
                     r"time \d+\.\d+ ms", out)
    loaded = torch.jit.load(str(tmp_path / "squashed.pt"))
    assert fake_sparsities(loaded) == {}
    assert getattr(loaded, "0").weight_sparsity is None
    for _, module in loaded.named_modules():
        assert not sparsity_utils.module_contains_param(module, "FakeSparsity")
    with torch.no_grad():
        assert torch.equal(loaded(example), expected)
    assert "pruned tensors: 0\n" in run_ok(tmp_path / "squashed.pt")


def test_model_with_hand_written_layers(tmp_path):
    """A module that holds `weight` and `weight_sparsity` itself (the README's
    SparseLinear): listed and re-pruned; not squashed, since its attribute is
    not Optional."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    sparsify_with_plugin(model, {"0": torch.rand(6, 4) > 0.5})
    torch.jit.script(model).save(str(tmp_path / "hand.pt"))
    out = run_ok(tmp_path / "hand.pt", "--prune", "0.5", "--save", tmp_path / "pruned.pt")
    assert "pruned tensors: 1\n" in out and re.search(r"^  0\.weight +\[6, 4\] +bool +0\.500$", out, re.M)
    loaded = torch.jit.load(str(tmp_path / "pruned.pt"))
    assert (getattr(loaded, "0").weight_sparsity.mask == 0).sum().item() == 12
    result = sparsity_run(tmp_path / "hand.pt", "--squash", "--save", tmp_path / "squashed.pt")
    assert result.returncode == 1
    assert "attribute weight_sparsity is not declared Optional" in result.stderr
    assert not (tmp_path / "squashed.pt").exists()


def test_model_pruned_with_nn_utils_prune(tmp_path):
    """A model pruned with torch.nn.utils.prune (magnitude, channels, a bias),
    converted and scripted: listed, run, re-pruned and squashed."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    eager = small_cnn().eval()
    prune.l1_unstructured(eager[0], "weight", amount=0.5)
    prune.ln_structured(eager[4], "weight", amount=0.4, n=2, dim=0)
    prune.random_unstructured(eager[4], "bias", amount=0.4)
    example = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = eager(example)
    paths = {name: tmp_path / f"{name}.pt" for name in ["model", "input", "expected", "pruned", "squashed"]}
    torch.jit.script(convert(eager)).save(str(paths["model"]))
    torch.save(example, paths["input"])
    torch.save(expected, paths["expected"])

    out = run_ok(paths["model"], "--input", paths["input"], "--expect", paths["expected"], "--atol", "0", "--runs", "1")
    assert "pruned tensors: 3\n" in out and "max |output - expected| = 0.000e+00" in out
    for fqn in ["0.weight", "4.weight", "4.bias"]:
        module_fqn, _, name = fqn.partition(".")
        mask = getattr(eager.get_submodule(module_fqn), name + "_mask")
        shape = "[" + ", ".join(str(s) for s in mask.shape) + "]"
        level = (mask == 0).float().mean().item()
        assert re.search(rf"^  {re.escape(fqn)} +{re.escape(shape)} +bool +{level:.3f}$", out, re.M), out

    out = run_ok(paths["model"], "--prune", "0.75", "--save", paths["pruned"])
    assert "re-pruned 3 tensors by magnitude to sparsity 0.75" in out
    assert all((s.mask == 0).sum().item() == round(0.75 * s.mask.numel())
               for s in fake_sparsities(torch.jit.load(str(paths["pruned"]))).values())

    out = run_ok(paths["model"], "--input", paths["input"], "--runs", "1", "--squash", "--save", paths["squashed"])
    assert "squashed 3 masks into their tensors; the model holds no masks now" in out
    squashed = torch.jit.load(str(paths["squashed"]))
    assert fake_sparsities(squashed) == {}
    with torch.no_grad():
        assert torch.equal(squashed(example), expected)


def _bad_cases(paths, tmp):
    model = paths["model"]
    return [
        # (arguments, exit status, message)
        ([], 2, "no model given"),
        ([model, "--bogus"], 2, "unknown option '--bogus'"),
        ([model, "--prune"], 2, "--prune needs a value"),
        ([model, "--prune", "1.5"], 2, "--prune expects a sparsity level between 0 and 1, got 1.5"),
        ([model, "--prune", "half"], 2, "--prune expects a number, got 'half'"),
        ([model, "--prune", "0.5x"], 2, "--prune expects a number, got '0.5x'"),
        ([model, "--shape", "1,3,6,6", "--runs", "0"], 2, "--runs expects a positive number of runs, got 0"),
        ([model, "--shape", "1,,6"], 2, "--shape expects an integer, got ''"),
        ([model, "--shape", "1,-3"], 2, "--shape sizes must be positive"),
        ([model, "--shape", "1,3,"], 2, "--shape expects sizes separated by commas"),
        ([model, "--seed", "x", "--shape", "1"], 2, "--seed expects an integer, got 'x'"),
        ([model, "--set-mask", "0.weight"], 2, "--set-mask expects FQN=FILE, got '0.weight'"),
        ([model, "--set-mask", "=m.pt"], 2, "--set-mask expects FQN=FILE"),
        ([model, "--atol", "1e-5"], 2, "--atol needs --expect"),
        ([model, "--input", paths["input"], "--expect", paths["expected"], "--atol", "-1"], 2, "--atol expects a tolerance >= 0"),
        ([model, "--expect", paths["expected"]], 2, "--runs, --expect and --output need an input"),
        ([model, "--runs", "3"], 2, "--runs, --expect and --output need an input"),
        ([model, "--input", paths["input"], "--shape", "1"], 2, "give either --input or --shape, not both"),
        ([model, model], 2, "more than one model given"),
        ([tmp / "missing.pt"], 1, "cannot load the model '"),
        ([paths["garbage"]], 1, "cannot load the model '"),
        ([model, "--set-mask", f"nope.weight={paths['wrong_shape']}"], 1,
         "the model has no pruned tensor 'nope.weight' (it has 0.weight, 1.weight, 4.weight)"),
        ([model, "--set-mask", f"0.weight={tmp / 'missing.pt'}"], 1, "cannot read mask file '"),
        ([model, "--set-mask", f"0.weight={paths['garbage']}"], 1, "cannot load mask file '"),
        ([model, "--set-mask", f"0.weight={paths['dict']}"], 1, "holds a GenericDict, not a tensor"),
        ([model, "--set-mask", f"0.weight={paths['wrong_shape']}"], 1,
         "--set-mask 0.weight: FakeSparsity.update_mask: new mask shape [3, 3] must equal the held mask shape [8, 3, 3, 3]"),
        ([model, "--input", paths["garbage"]], 1, "cannot load input file '"),
        ([model, "--input", paths["wrong_shape"]], 1, "inference failed on an input of shape [3, 3]: "),
        ([model, "--shape", "2,3,6,6", "--expect", paths["wrong_shape"]], 1, "the output has shape [2, 5] but"),
        ([model, "--shape", "1,3,6,6", "--runs", "1", "--output", tmp / "no" / "dir" / "out.pt"], 1, "cannot write '"),
        ([model, "--save", tmp / "no" / "dir" / "model.pt"], 1, "cannot save the model to '"),
    ]


@pytest.mark.parametrize("case", range(31))
def test_bad_arguments_and_files(files, tmp_path, case):
    cases = _bad_cases(files[0], tmp_path)
    assert len(cases) == 31
    args, status, message = cases[case]
    result = sparsity_run(*args)
    assert result.returncode == status, (args, result.returncode, result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert "Exception raised from" not in result.stderr  # messages, not backtraces
    if status == 2:
        assert "sparsity_run --help describes the options" in result.stderr


# ------------------------------------------------ AOTInductor packages (.pt2)


@pytest.fixture(scope="module")
def package_files(files, tmp_path_factory):
    """The same pruned CNN converted with target="export" and compiled into an
    AOTInductor package; its eager output, and with 4.weight's mask zeroed."""
    from torch_sparsity import aoti

    paths, eager, example, expected = files
    folder = tmp_path_factory.mktemp("sparsity_run_pt2")
    converted = convert(eager, target="export", compact_masks=False)
    package = aoti.compile(converted, (example,), folder / "model.pt2")
    mask = converted[4].weight_mask
    saved = mask.clone()
    mask.zero_()
    with torch.no_grad():
        zeroed = converted(example)
    mask.copy_(saved)
    torch.save(zeroed, folder / "zeroed.pt")
    torch.save(torch.zeros(5, 128), folder / "zeros_float.pt")  # converted to the package's bool
    return package, folder, converted


def test_package_lists_runs_and_compares(files, package_files):
    paths, _, _, expected = files
    package, _, converted = package_files
    out = run_ok(package, "--input", paths["input"], "--expect", paths["expected"], "--atol", 1e-5, "--runs", 2)
    assert "pruned tensors: 3\n" in out
    for fqn, dtype in MASK_DTYPES.items():
        assert re.search(rf"^  {re.escape(fqn)} +\[[0-9, ]+\] +{str(dtype).replace('torch.', '')} ", out, re.M), out
    assert float(re.search(r"max \|output - expected\| = (\S+)", out).group(1)) <= 1e-5
    assert "median inference time over 2 runs" in out


def test_package_set_mask_and_prune_change_that_run(files, package_files):
    paths, _, _, _ = files
    package, folder, _ = package_files
    out = run_ok(package, "--set-mask", f"4.weight={folder / 'zeros_float.pt'}", "--input", paths["input"],
                 "--expect", folder / "zeroed.pt", "--atol", 1e-5, "--runs", 1)
    assert re.search(r"set the mask of 4\.weight from .*: sparsity 0\.\d+ -> 1\.000", out), out
    out = run_ok(package, "--prune", 0.75, "--shape", "1,3,6,6", "--runs", 1)
    assert "re-pruned 3 tensors by magnitude to sparsity 0.75" in out
    assert re.search(r"^  4\.weight +\[5, 128\] +bool +0\.750$", out, re.M), out
    # For that run only: the file is unchanged.
    assert float(re.search(r"max \|output - expected\| = (\S+)", run_ok(
        package, "--input", paths["input"], "--expect", paths["expected"], "--runs", 1)).group(1)) <= 1e-5


@pytest.mark.parametrize("args, message", [
    (["--squash"], "--squash works on TorchScript models only"),
    (["--save", "x.pt2"], "--save works on TorchScript models only"),
    (["--set-mask", "nope.weight=MASK"], "the model has no pruned tensor 'nope.weight' (it has 0.weight, 1.weight, 4.weight)"),
    (["--set-mask", "0.weight=MASK"], "--set-mask 0.weight: PrunedPackage.set_mask: the mask of 0.weight has shape [8, 3, 3, 3], got [5, 128]"),
])
def test_package_refusals(package_files, args, message):
    package, folder, _ = package_files
    args = [str(a).replace("MASK", str(folder / "zeros_float.pt")) for a in args]
    result = sparsity_run(package, *args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert "Exception raised from" not in result.stderr


def test_missing_package(tmp_path):
    result = sparsity_run(tmp_path / "none.pt2")
    assert result.returncode == 1 and "cannot load the package '" in result.stderr, result.stderr
