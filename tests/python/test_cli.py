"""The command line (python -m torch_sparsity.convert, torch_sparsity.cli):
a model from a module:callable, pruned or given masks and weights files,
converted, checked against eager, saved, and an AOTInductor package of it."""

import re
import subprocess
import sys

import pytest
import torch
from torch.ao.pruning import WeightNormSparsifier

from sparsity_testing import assert_outputs_equal, max_abs_diff, relative_diff
from torch_sparsity import aoti
from torch_sparsity.cli import main
from torch_sparsity.convert import fake_sparsities
from torch_sparsity.sparsifiers import ChannelPruner, prepare_with_masks

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The default weight initialization of:FutureWarning"),
]


@pytest.fixture(scope="module")
def small_factory(tmp_path_factory):
    """A module:callable for the command line, that builds a small CNN."""
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
        (["--shrink"], "--shrink needs --input-shape"),
        (["--channel-sparsity", "-0.1", "--input-shape", "2,3,6,6"], "--channel-sparsity must be in"),
        (["--channel-sparsity", "0.5"], "--channel-sparsity needs --input-shape"),
        (["--channel-sparsity", "0.5", "--sparsity", "0.5"], "not allowed with argument"),
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


def channel_masks(path):
    """Masks that zero the conv's channels 0 to 4 (rows, bias, BatchNorm's
    weight and bias), torch.save'd to `path`."""
    keep = torch.arange(8) >= 5
    torch.save({"0.weight": keep.view(8, 1, 1, 1).expand(8, 3, 3, 3).clone(), "0.bias": keep,
                "1.weight": keep, "1.bias": keep}, path)


def test_command_line_shrinks_and_prints_the_report(small_factory, tmp_path, capsys):
    channel_masks(tmp_path / "masks.pt")
    package = tmp_path / "model.pt2"
    status = main(["--model", small_factory, "--masks", str(tmp_path / "masks.pt"), "-o", str(tmp_path / "model.pt"),
                   "--input-shape", "2,3,6,6", "--shrink", "--save-input", str(tmp_path / "in.pt"),
                   "--save-output", str(tmp_path / "out.pt"), "--aoti-package", str(package)])
    printed = capsys.readouterr().out
    assert status == 0
    assert re.search(r"^0 +8 +5 +3: ", printed, re.M), printed  # the conv's group: 8 channels, 5 removed
    assert re.search(r"^parameters +before +\d+ +after +\d+ +ratio", printed, re.M), printed
    assert "converted 4 pruned tensors" in printed
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    assert fake_sparsities(loaded)["0.weight"].mask.shape == (3, 3, 3, 3)
    assert getattr(loaded, "4").weight.shape == (5, 3 * 4 * 4)
    example, expected = torch.load(tmp_path / "in.pt"), torch.load(tmp_path / "out.pt")
    torch.manual_seed(0)  # the command line's default seed: the same weights
    masked = prepare_with_masks(__import__("cli_models").small_cnn().eval(), torch.load(tmp_path / "masks.pt"))
    with torch.no_grad():
        assert relative_diff(expected, masked(example)) == 0  # the masked model's output, not the shrunk one's
        assert relative_diff(loaded(example), expected) <= 1e-5
    assert relative_diff(aoti.load(package)(example), expected) <= 1e-5


def test_command_line_shrink_refusal(small_factory, tmp_path, capsys):
    channel_masks(tmp_path / "masks.pt")
    status = main(["--model", small_factory, "--masks", str(tmp_path / "masks.pt"), "-o", str(tmp_path / "m.pt"),
                   "--input-shape", "2,5,6,6", "--shrink"])
    assert status == 1
    assert "torch_sparsity.convert: cannot shrink: " in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_command_line_prunes_channels_and_shrinks(small_factory, tmp_path, capsys):
    status = main(["--model", small_factory, "--channel-sparsity", "0.5", "-o", str(tmp_path / "model.pt"),
                   "--input-shape", "2,3,6,6", "--shrink", "--save-input", str(tmp_path / "in.pt"),
                   "--save-output", str(tmp_path / "out.pt")])
    printed = capsys.readouterr().out
    assert status == 0
    # The conv's group is pruned; the classifier's, the model's output, is not in the config.
    assert "ChannelPruner: 4 of 8 channels masked in 1 channel groups (1 left alone)" in printed
    assert re.search(r"^0 +8 +4 +4: ", printed, re.M), printed
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    assert fake_sparsities(loaded)["0.weight"].mask.shape == (4,)  # a row mask, on the 4 channels kept
    assert getattr(loaded, "4").weight.shape == (5, 4 * 4 * 4)
    example, expected = torch.load(tmp_path / "in.pt"), torch.load(tmp_path / "out.pt")
    torch.manual_seed(0)  # the command line's default seed: the same weights, then the same input
    masked = __import__("cli_models").small_cnn().eval()
    assert torch.equal(torch.randn(2, 3, 6, 6), example)
    pruner = ChannelPruner((example,), 0.5)
    pruner.prepare(masked, [{"tensor_fqn": "0.weight"}])
    pruner.step()
    with torch.no_grad():
        assert relative_diff(expected, masked(example)) == 0  # the masked model's output
        assert relative_diff(loaded(example), expected) <= 1e-5


def test_command_line_compiles_an_unpruned_model_into_a_plain_package(small_factory, tmp_path, capsys):
    """The dense baseline a pruned package is measured against."""
    package = tmp_path / "model.pt2"
    status = main(["--model", small_factory, "-o", str(tmp_path / "model.pt"), "--input-shape", "2,3,6,6",
                   "--save-input", str(tmp_path / "in.pt"), "--save-output", str(tmp_path / "out.pt"),
                   "--aoti-package", str(package)])
    assert status == 0
    assert f"AOTInductor package of the same model (0 masks live) saved to {package}" in capsys.readouterr().out
    runner = aoti.load(package)
    assert runner.mask_names() == []
    expected = torch.load(tmp_path / "out.pt")
    assert relative_diff(runner(torch.load(tmp_path / "in.pt")), expected) <= 1e-5


def test_command_line(tmp_path):
    """python -m torch_sparsity.convert runs as a program, from any folder."""
    result = subprocess.run(
        [sys.executable, "-m", "torch_sparsity.convert", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0 and "--sparsity" in result.stdout
    assert "python -m torch_sparsity.convert" in result.stdout
