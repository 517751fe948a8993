"""FakeSparsity.forward's inference cache: when it answers, when it must not,
and that what it returns is always bit for bit mask * x. Hits hand out the
kept tensor itself (as torch.nn.utils.parametrize.cached() hands out one
tensor); a write through it, or a change of its metadata, is seen and the
next forward recomputes."""

import copy
import io
import itertools

import pytest
import torch
from sparsity_testing import (
    MASK_DTYPES,
    X_DTYPES,
    SparseConv2d,
    SparseLinear,
    assert_bitwise_equal,
    forward_counting_hits,
    held_mask_times,
    make_mask,
    make_x,
    plugin_weight,
)

FakeSparsity = torch.classes.sparsity.FakeSparsity


# ---------------------------------------------------------------- hits


def test_second_forward_is_a_hit_with_the_same_values():
    fs = FakeSparsity(make_mask((6, 7), torch.bool))
    w = plugin_weight()
    first, hit = forward_counting_hits(fs, w)
    assert not hit and fs.cache_hits() == 0
    for _ in range(3):
        again, hit = forward_counting_hits(fs, w)
        assert hit
        assert_bitwise_equal(again, held_mask_times(fs, w))
        assert again is first  # the kept tensor itself: nothing copied
        assert not again.requires_grad and again.grad_fn is None
    assert fs.cache_hits() == 3


@pytest.mark.parametrize("x_dtype,mask_dtype", list(itertools.product(X_DTYPES, MASK_DTYPES)))
def test_hits_are_bitwise_mask_times_x_for_every_dtype(x_dtype, mask_dtype):
    w = plugin_weight((5, 9), x_dtype)
    fs = FakeSparsity(make_mask((5, 9), mask_dtype, special=True))
    for expect_hit in (False, True):
        out, hit = forward_counting_hits(fs, w)
        assert hit == expect_hit
        assert_bitwise_equal(out, held_mask_times(fs, w))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_hits_keep_the_layout_of_mask_times_x(layout):
    if layout == "transposed":
        w, mask = make_x((7, 6), torch.float32).t(), make_mask((6, 7), torch.uint8)
    elif layout == "channels_last":
        w = make_x((2, 3, 4, 5), torch.float32).contiguous(memory_format=torch.channels_last)
        mask = make_mask((2, 3, 4, 5), torch.bool)
    else:
        w, mask = make_x((8, 10), torch.float32)[::2, 1:], make_mask((4, 9), torch.float32)
    fs = FakeSparsity(mask)
    forward_counting_hits(fs, w)
    out, hit = forward_counting_hits(fs, w)
    assert hit
    assert_bitwise_equal(out, mask * w)
    assert out.stride() == torch.ops.sparsity.fake_sparsity(w, mask).stride()  # as uncached


def test_grad_mode_without_requires_grad_hits():
    fs = FakeSparsity(make_mask((4, 4), torch.bool))
    w = make_x((4, 4), torch.float32)  # a frozen weight
    fs.forward(w)
    out = fs.forward(w)
    assert fs.cache_hits() == 1 and not out.requires_grad
    assert_bitwise_equal(out, fs.mask * w)


def test_inference_mode_hits_with_normal_tensors():
    fs = FakeSparsity(make_mask((4, 4), torch.bool))
    w = plugin_weight((4, 4))
    with torch.inference_mode():
        fs.forward(w)
        out = fs.forward(w)
        # The kept tensor is a normal one even here: its version counter is
        # what shows a write through it.
        assert not out.is_inference()
    assert fs.cache_hits() == 1
    assert_bitwise_equal(out, held_mask_times(fs, w))
    again, hit = forward_counting_hits(fs, w)
    assert hit and again is out
    with torch.inference_mode():
        out.add_(1)  # seen in inference mode too
        fresh = fs.forward(w)
    assert fs.cache_hits() == 2 and fresh is not out
    assert_bitwise_equal(fresh, held_mask_times(fs, w))


def test_scripted_models_hit_in_inference():
    linear, conv = torch.nn.Linear(8, 5), torch.nn.Conv2d(3, 4, 3)
    model = torch.nn.Sequential(
        SparseConv2d(conv, make_mask(conv.weight.shape, torch.bool)),
        torch.nn.Flatten(),
        SparseLinear(torch.nn.Linear(4 * 2 * 2, 8), make_mask((8, 16), torch.bool)),
        SparseLinear(linear, make_mask(linear.weight.shape, torch.uint8)),
    )
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        expected = model(x)
        for _ in range(3):
            assert_bitwise_equal(scripted(x), expected)
    # The eager model shares the FakeSparsity objects: its call was the miss.
    assert [m.weight_sparsity.cache_hits() for m in (scripted[0], scripted[2], scripted[3])] == [3, 3, 3]


# ---------------------------------------------------------------- misses


def _edits():
    """(name, edit(fs, w) -> the weight to call forward with next)."""

    def inplace_weight(fs, w):
        with torch.no_grad():
            w.mul_(2)
        return w

    def inplace_view_of_weight(fs, w):
        with torch.no_grad():
            w[0].zero_()
        return w

    def inplace_base_of_weight(fs, w):
        # w is a view; the edit goes through its base.
        with torch.no_grad():
            w._base.add_(1)
        return w

    def inplace_mask(fs, w):
        fs.mask.logical_not_()
        return w

    def inplace_view_of_mask(fs, w):
        fs.mask[1:].fill_(True)
        return w

    def update_mask(fs, w):
        fs.update_mask(torch.ones_like(fs.mask))
        return w

    def update_mask_same_values(fs, w):
        fs.update_mask(fs.mask.clone())
        return w

    def other_weight_same_values(fs, w):
        return torch.nn.Parameter(w.detach().clone())

    def weight_data_replaced(fs, w):
        w.data = torch.randn_like(w)
        return w

    def weight_set_(fs, w):
        with torch.no_grad():
            w.set_(torch.randn_like(w))
        return w

    def weight_as_strided_(fs, w):
        with torch.no_grad():
            w.as_strided_(w.shape[::-1], w.stride()[::-1])  # a transpose, in place
        return w

    def mask_set_(fs, w):
        fs.mask.set_(fs.mask.clone().logical_not_())
        return w

    def mask_data_replaced(fs, w):
        fs.mask.data = torch.ones_like(fs.mask)
        return w

    def weight_dtype(fs, w):
        return w.detach().double()

    def load_state_dict_of_owner(fs, w):
        owner = torch.nn.Module()
        owner.weight = w
        owner.load_state_dict({"weight": torch.randn(w.shape)})
        return w

    def optimizer_step(fs, w):
        opt = torch.optim.SGD([w], lr=0.1)
        w.grad = torch.ones_like(w)
        opt.step()
        return w

    return {
        name: fn
        for name, fn in locals().items()
        if callable(fn)
    }


EDITS = _edits()


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edits_invalidate(name):
    base = plugin_weight((6, 6)) if name != "inplace_base_of_weight" else make_x((6, 12), torch.float32)
    w = base if name != "inplace_base_of_weight" else base[:, ::2]
    fs = FakeSparsity(make_mask((6, 6), torch.bool))
    forward_counting_hits(fs, w)
    out, hit = forward_counting_hits(fs, w)
    assert hit
    w = EDITS[name](fs, w)
    out, hit = forward_counting_hits(fs, w)
    assert not hit, name
    assert_bitwise_equal(out, held_mask_times(fs, w))
    # and the new result is what is kept now
    out, hit = forward_counting_hits(fs, w)
    assert hit
    assert_bitwise_equal(out, held_mask_times(fs, w))


def test_grad_mode_with_requires_grad_computes_a_graph_and_drops_the_cache():
    fs = FakeSparsity(make_mask((4, 5), torch.bool))
    w = plugin_weight((4, 5))
    forward_counting_hits(fs, w)
    out = fs.forward(w)
    assert fs.cache_hits() == 0 and out.grad_fn is not None
    (grad,) = torch.autograd.grad(out.sum(), w)
    assert_bitwise_equal(grad, fs.mask.float())
    # The graph-building call dropped the kept result: the next no_grad call recomputes.
    _, hit = forward_counting_hits(fs, w)
    assert not hit
    # A mask that requires grad needs a graph too.
    fmask = torch.rand(4, 5, requires_grad=True)
    fs2 = FakeSparsity(fmask)
    x = make_x((4, 5), torch.float32)
    fs2.forward(x)
    out = fs2.forward(x)
    assert fs2.cache_hits() == 0 and out.grad_fn is not None


def test_inference_tensors_are_never_cached():
    with torch.inference_mode():
        w = torch.randn(4, 4)
        mask = torch.rand(4, 4) > 0.5
    fs = FakeSparsity(mask)
    for _ in range(3):
        with torch.inference_mode():
            out = fs.forward(w)
        assert_bitwise_equal(out, mask * w)
    assert fs.cache_hits() == 0
    fs2 = FakeSparsity(torch.rand(4, 4) > 0.5)
    with torch.inference_mode():
        x = torch.randn(4, 4)
        fs2.forward(x)
        fs2.forward(x)
        x.mul_(3)  # inference tensors have no version counter to see this
        assert_bitwise_equal(fs2.forward(x), fs2.mask * x)
    assert fs2.cache_hits() == 0


def test_jit_save_and_load_start_with_an_empty_cache():
    linear = torch.nn.Linear(6, 4)
    scripted = torch.jit.script(SparseLinear(linear, make_mask((4, 6), torch.bool)))
    x = torch.randn(3, 6)
    with torch.no_grad():
        scripted(x)
        expected = scripted(x)
    assert scripted.weight_sparsity.cache_hits() == 1
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert loaded.weight_sparsity.cache_hits() == 0
    # The cache is not in the pickled state.
    (version, tensors), _ = scripted.weight_sparsity.__getstate__()
    assert set(tensors) == {"mask"}
    with torch.no_grad():
        assert_bitwise_equal(loaded(x), expected)
        assert loaded.weight_sparsity.cache_hits() == 0
        assert_bitwise_equal(loaded(x), expected)
    assert loaded.weight_sparsity.cache_hits() == 1


def test_deepcopy_starts_with_an_empty_cache_and_shares_nothing():
    scripted = torch.jit.script(SparseLinear(torch.nn.Linear(6, 4), make_mask((4, 6), torch.bool)))
    x = torch.randn(3, 6)
    with torch.no_grad():
        scripted(x)
        scripted(x)
    clone = copy.deepcopy(scripted)
    assert clone.weight_sparsity.cache_hits() == 0
    with torch.no_grad():
        clone.weight.mul_(-1)
        clone.weight_sparsity.update_mask(torch.ones(4, 6, dtype=torch.bool))
        assert_bitwise_equal(clone(x), torch.nn.functional.linear(x, clone.weight, clone.bias))
        # The original still hits, with its own weight and mask.
        expected = torch.nn.functional.linear(x, scripted.weight_sparsity.mask * scripted.weight, scripted.bias)
        assert_bitwise_equal(scripted(x), expected)
    assert scripted.weight_sparsity.cache_hits() == 2


@pytest.mark.parametrize("change", ["double", "to_float16", "load_state_dict"])
def test_changes_to_a_scripted_model_invalidate(change):
    linear = torch.nn.Linear(6, 4)
    scripted = torch.jit.script(SparseLinear(linear, make_mask((4, 6), torch.bool)))
    x = torch.randn(3, 6)
    with torch.no_grad():
        scripted(x)
        scripted(x)
    fs = scripted.weight_sparsity
    assert fs.cache_hits() == 1
    if change == "double":
        scripted.double()
        x = x.double()
    elif change == "to_float16":
        scripted.to(torch.float16)
        x = x.half()
    else:
        scripted.load_state_dict({"weight": torch.randn(4, 6), "bias": torch.randn(4)})
    expected = torch.nn.functional.linear(x, fs.mask * scripted.weight.detach(), scripted.bias)
    with torch.no_grad():
        assert_bitwise_equal(scripted(x), expected)
        assert fs.cache_hits() == 1  # that was a miss
        assert_bitwise_equal(scripted(x), expected)
    assert fs.cache_hits() == 2


def test_cache_can_be_turned_off_and_cleared():
    fs = FakeSparsity(make_mask((4, 4), torch.bool))
    w = plugin_weight((4, 4))
    assert fs.cache_enabled()
    fs.set_cache_enabled(False)
    assert not fs.cache_enabled()
    for _ in range(3):
        out, hit = forward_counting_hits(fs, w)
        assert not hit
        assert_bitwise_equal(out, held_mask_times(fs, w))
    fs.set_cache_enabled(True)
    forward_counting_hits(fs, w)
    assert forward_counting_hits(fs, w)[1]
    fs.clear_cache()
    assert not forward_counting_hits(fs, w)[1]
    # The escape hatch for writes that bypass the version counter.
    w.data.mul_(0.5)
    fs.clear_cache()
    out, hit = forward_counting_hits(fs, w)
    assert not hit
    assert_bitwise_equal(out, held_mask_times(fs, w))


def test_setting_is_scriptable():
    @torch.jit.script
    def toggle(fs: torch.classes.sparsity.FakeSparsity, on: bool) -> int:
        fs.set_cache_enabled(on)
        fs.clear_cache()
        return fs.cache_hits() + int(fs.cache_enabled())

    fs = FakeSparsity(torch.ones(2, dtype=torch.bool))
    assert toggle(fs, False) == 0 and not fs.cache_enabled()
    assert toggle(fs, True) == 1
