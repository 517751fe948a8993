"""The masks convert holds: compact_mask (bool where that gives the same
bits), mask_bytes, compacting on request in place; and the N-d weight-norm
sparsifier that makes masks for convolutions."""

import copy

import pytest
import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier

from sparsity_testing import assert_bitwise_equal, make_x
from torch_sparsity.convert import compact_mask, convert, mask_bytes
from torch_sparsity.sparsifiers import NDWeightNormSparsifier, prepare_with_masks, prune_with_weight_norm


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
