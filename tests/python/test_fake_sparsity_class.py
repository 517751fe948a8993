"""torch.classes.sparsity.FakeSparsity, alone and inside scripted modules,
against torch.ao.pruning's FakeSparsity parametrization."""

import copy
import io
import math

import pytest
import torch
from sparsity_testing import (
    MASK_DTYPES,
    STATE_PATCHES,
    SmallNet,
    SparseConv2d,
    SparseLinear,
    assert_bitwise_equal,
    make_mask,
    make_x,
    write_patched_archive,
)
from torch.ao.pruning.sparsifier.utils import FakeSparsity as ReferenceFakeSparsity
from torch.nn.utils import parametrize

FakeSparsity = torch.classes.sparsity.FakeSparsity


def test_forward_is_mask_times_x():
    for dtype in MASK_DTYPES:
        mask = make_mask((4, 5), dtype)
        x = torch.randn(4, 5)
        assert_bitwise_equal(FakeSparsity(mask).forward(x), ReferenceFakeSparsity(mask)(x))


def test_mask_is_the_held_tensor():
    mask = torch.ones(3, 3)
    fs = FakeSparsity(mask)
    assert fs.mask is mask
    assert fs.get_mask() is mask
    mask[0] = 0  # an in-place edit changes later forwards
    assert torch.equal(fs.forward(torch.ones(3, 3))[0], torch.zeros(3))


def test_update_mask_copies_in_place():
    mask = torch.ones(2, 3, dtype=torch.bool)
    fs = FakeSparsity(mask)
    fs.update_mask(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0]]))
    assert fs.mask is mask
    assert torch.equal(mask, torch.tensor([[True, False, True], [False, False, True]]))
    assert torch.equal(fs.forward(torch.ones(2, 3)), mask.float())


def test_update_mask_errors_change_nothing():
    mask = torch.rand(2, 3) > 0.5
    before = mask.clone()
    fs = FakeSparsity(mask)
    with pytest.raises(RuntimeError, match=r"new mask shape \[3, 2\] must equal the held mask shape \[2, 3\]"):
        fs.update_mask(torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="mask must be bool, uint8 or floating"):
        fs.update_mask(torch.ones(2, 3, dtype=torch.int64))
    assert fs.mask is mask and torch.equal(mask, before)


def test_constructor_rejects_bad_masks():
    with pytest.raises(RuntimeError, match="mask must be bool, uint8 or floating.*Int"):
        FakeSparsity(torch.ones(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="strided"):
        FakeSparsity(torch.eye(3).to_sparse())


def test_forward_errors():
    fs = FakeSparsity(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match=r"mask shape \[2, 3\] must equal x shape \[3, 2\]"):
        fs.forward(torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="x must be a floating tensor"):
        fs.forward(torch.ones(2, 3, dtype=torch.int64))


def test_state_dict_is_empty_like_reference():
    mask = torch.ones(3)
    assert FakeSparsity(mask).state_dict() == {} == ReferenceFakeSparsity(mask).state_dict()


@pytest.mark.parametrize("dtype", MASK_DTYPES)
def test_sparsity_level(dtype):
    mask = make_mask((10, 10), dtype)
    expected = (mask == 0).float().mean().item()
    assert FakeSparsity(mask).sparsity_level() == pytest.approx(expected, abs=1e-12)
    assert math.isnan(FakeSparsity(torch.ones(0)).sparsity_level())
    assert FakeSparsity(torch.tensor([float("nan"), 0.0])).sparsity_level() == 0.5


def test_deepcopy_keeps_an_independent_mask():
    mask = torch.rand(4, 4) > 0.5
    fs = FakeSparsity(mask)
    clone = copy.deepcopy(fs)
    assert clone.mask is not mask and torch.equal(clone.mask, mask)
    mask.zero_()
    assert clone.mask.any()


def test_pickled_state_is_versioned_and_a_copy():
    mask = torch.ones(2)
    (version, tensors), qualified_name = FakeSparsity(mask).__getstate__()
    assert qualified_name == "__torch__.torch.classes.sparsity.FakeSparsity"
    assert version == 1 and set(tensors) == {"mask"}
    assert tensors["mask"] is not mask and torch.equal(tensors["mask"], mask)


class HoldsFakeSparsity(torch.nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.sparsity = FakeSparsity(mask)

    def forward(self, x):
        return self.sparsity.forward(x)


@pytest.mark.parametrize("case", sorted(STATE_PATCHES))
def test_bad_pickled_state_in_a_file_is_a_clear_error(tmp_path, case):
    old, new, message = STATE_PATCHES[case]
    torch.jit.save(torch.jit.script(HoldsFakeSparsity(torch.ones(2))), tmp_path / "good.pt")
    write_patched_archive(tmp_path / "good.pt", tmp_path / "bad.pt", old, new)
    with pytest.raises(RuntimeError, match=message):
        torch.jit.load(tmp_path / "bad.pt")
    # The unpatched file still loads.
    assert torch.equal(torch.jit.load(tmp_path / "good.pt")(torch.full((2,), 3.0)), torch.full((2,), 3.0))


# ------------------------------------------------------- scripted modules


def _eager_and_scripted(mask_dtype):
    eager = SmallNet()
    conv_mask = make_mask(eager.conv.weight.shape, mask_dtype)
    fc_mask = make_mask(eager.fc.weight.shape, mask_dtype)
    plugin = SmallNet()
    plugin.load_state_dict(eager.state_dict())
    plugin.conv = SparseConv2d(plugin.conv, conv_mask.clone())
    plugin.fc = SparseLinear(plugin.fc, fc_mask.clone())
    parametrize.register_parametrization(eager.conv, "weight", ReferenceFakeSparsity(conv_mask))
    parametrize.register_parametrization(eager.fc, "weight", ReferenceFakeSparsity(fc_mask))
    return eager, torch.jit.script(plugin)


def _forward_and_weight_grads(model, x, weights):
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), weights)
    return out, grads


def _check_against_reference(eager, scripted):
    x = torch.randn(4, 3, 6, 6)
    ref_out, ref_grads = _forward_and_weight_grads(
        eager, x, [eager.conv.parametrizations.weight.original, eager.fc.parametrizations.weight.original]
    )
    out, grads = _forward_and_weight_grads(scripted, x, [scripted.conv.weight, scripted.fc.weight])
    assert_bitwise_equal(out, ref_out)
    for a, b in zip(grads, ref_grads):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32])
def test_scripted_module_matches_ao_pruning(mask_dtype):
    eager, scripted = _eager_and_scripted(mask_dtype)
    _check_against_reference(eager, scripted)
    # The owner's state dict never carries masks.
    assert set(scripted.state_dict()) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}

    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer, map_location="cpu")
    _check_against_reference(eager, loaded)
    assert torch.equal(loaded.fc.weight_sparsity.mask, scripted.fc.weight_sparsity.mask)


def test_mask_edits_inside_a_scripted_module_change_its_output():
    eager, scripted = _eager_and_scripted(torch.bool)
    x = torch.randn(2, 3, 6, 6)
    scripted.fc.weight_sparsity.update_mask(torch.zeros_like(scripted.fc.weight_sparsity.mask))
    assert torch.equal(scripted(x), scripted.fc.bias.expand(2, 10))
    scripted.fc.weight_sparsity.mask.fill_(True)  # the very tensor, edited in place
    dense = SmallNet()
    dense.load_state_dict({k: v for k, v in scripted.state_dict().items()})
    dense.conv.weight.data.mul_(scripted.conv.weight_sparsity.mask)
    torch.testing.assert_close(scripted(x), dense(x))


def test_deepcopy_of_scripted_module_keeps_masks():
    _, scripted = _eager_and_scripted(torch.bool)
    clone = copy.deepcopy(scripted)
    assert clone.fc.weight_sparsity.mask is not scripted.fc.weight_sparsity.mask
    assert torch.equal(clone.fc.weight_sparsity.mask, scripted.fc.weight_sparsity.mask)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(clone(x), scripted(x))


def test_script_function_using_the_class():
    @torch.jit.script
    def apply(fs: torch.classes.sparsity.FakeSparsity, x: torch.Tensor) -> torch.Tensor:
        fs.update_mask(fs.mask.logical_not())
        return fs.forward(x) + fs.sparsity_level()

    mask = torch.tensor([True, False, True, True])
    fs = FakeSparsity(mask)
    out = apply(fs, torch.ones(4))
    assert torch.equal(mask, torch.tensor([False, True, False, False]))
    assert torch.equal(out, torch.tensor([0.75, 1.75, 0.75, 0.75]))


def test_forward_on_meta_input_keeps_the_real_mask():
    mask = torch.ones(2, 2)
    fs = FakeSparsity(mask)
    out = fs.forward(torch.empty(2, 2, device="meta"))
    assert out.device.type == "meta"
    assert fs.mask is mask and fs.mask.device.type == "cpu"


# ------------------------------------------------ moved to another device


class MaskedAdd(torch.nn.Module):
    """forward(x) = FakeSparsity(mask).forward(x) + bias."""

    def __init__(self, mask):
        super().__init__()
        self.sparsity = FakeSparsity(mask)
        self.bias = torch.nn.Parameter(torch.randn(mask.shape[-1]))

    def forward(self, x):
        return self.sparsity.forward(x) + self.bias


def test_scripted_module_moved_to_a_device(device):
    mask = torch.rand(3, 8) > 0.5
    module = torch.jit.script(MaskedAdd(mask))
    x = make_x((3, 8), torch.float32, device=device).nan_to_num()
    moved = module.to(device)
    out = moved(x)
    assert out.device.type == device
    assert_bitwise_equal(out, mask.to(device) * x + module.bias, f"after .to({device!r})")


def test_scripted_module_loaded_with_map_location(device):
    mask = torch.rand(3, 8) > 0.5
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(MaskedAdd(mask)), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer, map_location=device)
    x = make_x((3, 8), torch.float32, device=device).nan_to_num()
    out = loaded(x)
    assert out.device.type == device and loaded.bias.device.type == device
    assert_bitwise_equal(out, mask.to(device) * x + loaded.bias, f"after jit.load(map_location={device!r})")
