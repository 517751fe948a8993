"""FakeSparsity.forward's inference cache: when it answers, when it must not,
and that what it returns is always bit for bit mask * x. Hits hand out the
kept tensor itself (as torch.nn.utils.parametrize.cached() hands out one
tensor); a write through it, or a change of its metadata, is seen and the
next forward recomputes."""

import copy
import io
import itertools
import threading

import pytest
import torch
from sparsity_testing import (
    MASK_DTYPES,
    X_DTYPES,
    SparseConv2d,
    SparseLinear,
    assert_bitwise_equal,
    make_mask,
    make_x,
    needs_cuda,
)
from torch.utils._python_dispatch import TorchDispatchMode

FakeSparsity = torch.classes.sparsity.FakeSparsity


def _weight(shape=(6, 7), dtype=torch.float32):
    return torch.nn.Parameter(make_x(shape, dtype))


def _expected(fs, w):
    return fs.mask * w.detach()


def _forward_counting(fs, w):
    """fs.forward(w) under no_grad, and whether it was a cache hit."""
    hits = fs.cache_hits()
    with torch.no_grad():
        out = fs.forward(w)
    assert fs.cache_hits() - hits in (0, 1)
    return out, fs.cache_hits() > hits


# ---------------------------------------------------------------- hits


def test_second_forward_is_a_hit_with_the_same_values():
    fs = FakeSparsity(make_mask((6, 7), torch.bool))
    w = _weight()
    first, hit = _forward_counting(fs, w)
    assert not hit and fs.cache_hits() == 0
    for _ in range(3):
        again, hit = _forward_counting(fs, w)
        assert hit
        assert_bitwise_equal(again, _expected(fs, w))
        assert again is first  # the kept tensor itself: nothing copied
        assert not again.requires_grad and again.grad_fn is None
    assert fs.cache_hits() == 3


@pytest.mark.parametrize("x_dtype,mask_dtype", list(itertools.product(X_DTYPES, MASK_DTYPES)))
def test_hits_are_bitwise_mask_times_x_for_every_dtype(x_dtype, mask_dtype):
    w = _weight((5, 9), x_dtype)
    fs = FakeSparsity(make_mask((5, 9), mask_dtype, special=True))
    for expect_hit in (False, True):
        out, hit = _forward_counting(fs, w)
        assert hit == expect_hit
        assert_bitwise_equal(out, _expected(fs, w))


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
    _forward_counting(fs, w)
    out, hit = _forward_counting(fs, w)
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
    w = _weight((4, 4))
    with torch.inference_mode():
        fs.forward(w)
        out = fs.forward(w)
        # The kept tensor is a normal one even here: its version counter is
        # what shows a write through it.
        assert not out.is_inference()
    assert fs.cache_hits() == 1
    assert_bitwise_equal(out, _expected(fs, w))
    again, hit = _forward_counting(fs, w)
    assert hit and again is out
    with torch.inference_mode():
        out.add_(1)  # seen in inference mode too
        fresh = fs.forward(w)
    assert fs.cache_hits() == 2 and fresh is not out
    assert_bitwise_equal(fresh, _expected(fs, w))


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
    base = _weight((6, 6)) if name != "inplace_base_of_weight" else make_x((6, 12), torch.float32)
    w = base if name != "inplace_base_of_weight" else base[:, ::2]
    fs = FakeSparsity(make_mask((6, 6), torch.bool))
    _forward_counting(fs, w)
    out, hit = _forward_counting(fs, w)
    assert hit
    w = EDITS[name](fs, w)
    out, hit = _forward_counting(fs, w)
    assert not hit, name
    assert_bitwise_equal(out, _expected(fs, w))
    # and the new result is what is kept now
    out, hit = _forward_counting(fs, w)
    assert hit
    assert_bitwise_equal(out, _expected(fs, w))


def test_grad_mode_with_requires_grad_computes_a_graph_and_drops_the_cache():
    fs = FakeSparsity(make_mask((4, 5), torch.bool))
    w = _weight((4, 5))
    _forward_counting(fs, w)
    out = fs.forward(w)
    assert fs.cache_hits() == 0 and out.grad_fn is not None
    (grad,) = torch.autograd.grad(out.sum(), w)
    assert_bitwise_equal(grad, fs.mask.float())
    # The graph-building call dropped the kept result: the next no_grad call recomputes.
    _, hit = _forward_counting(fs, w)
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
    w = _weight((4, 4))
    assert fs.cache_enabled()
    fs.set_cache_enabled(False)
    assert not fs.cache_enabled()
    for _ in range(3):
        out, hit = _forward_counting(fs, w)
        assert not hit
        assert_bitwise_equal(out, _expected(fs, w))
    fs.set_cache_enabled(True)
    _forward_counting(fs, w)
    assert _forward_counting(fs, w)[1]
    fs.clear_cache()
    assert not _forward_counting(fs, w)[1]
    # The escape hatch for writes that bypass the version counter.
    w.data.mul_(0.5)
    fs.clear_cache()
    out, hit = _forward_counting(fs, w)
    assert not hit
    assert_bitwise_equal(out, _expected(fs, w))


def test_setting_is_scriptable():
    @torch.jit.script
    def toggle(fs: torch.classes.sparsity.FakeSparsity, on: bool) -> int:
        fs.set_cache_enabled(on)
        fs.clear_cache()
        return fs.cache_hits() + int(fs.cache_enabled())

    fs = FakeSparsity(torch.ones(2, dtype=torch.bool))
    assert toggle(fs, False) == 0 and not fs.cache_enabled()
    assert toggle(fs, True) == 1


# ------------------------------------------- results callers write to


def _writes_through_a_result():
    yield "add_", lambda r: r.add_(1)
    yield "zero_ of a view", lambda r: r[0].zero_()
    yield "requires_grad_", lambda r: r.requires_grad_()
    yield "t_", lambda r: r.t_()
    yield "resize_", lambda r: r.resize_(3)
    yield "set_", lambda r: r.set_(torch.ones(5, 5))
    yield "out=", lambda r: torch.mul(r, 2, out=r)


@pytest.mark.parametrize("write", list(_writes_through_a_result()), ids=lambda w: w[0])
def test_a_write_through_a_result_is_seen_and_the_next_forward_recomputes(write):
    _, change = write
    fs = FakeSparsity(make_mask((5, 5), torch.bool))
    w = _weight((5, 5))
    expected = _expected(fs, w)
    _forward_counting(fs, w)
    result, hit = _forward_counting(fs, w)
    assert hit
    with torch.no_grad():
        change(result)
    fresh, hit = _forward_counting(fs, w)
    assert not hit and fresh is not result
    assert_bitwise_equal(fresh, expected)
    again, hit = _forward_counting(fs, w)
    assert hit and again is fresh


def test_writes_that_bypass_version_counters_are_not_seen_until_clear_cache():
    """The documented limit (docs/performance.md): a write through .data or
    .numpy() changes no version counter, so the cache cannot see it; hits
    then hand out what was written, until clear_cache()."""
    for bypass in (lambda r: r.data.fill_(7), lambda r: r.numpy().__setitem__(slice(None), 7)):
        fs = FakeSparsity(make_mask((5, 5), torch.bool))
        w = _weight((5, 5))
        expected = _expected(fs, w)
        result, _ = _forward_counting(fs, w)
        bypass(result)
        stale, hit = _forward_counting(fs, w)
        assert hit and torch.equal(stale, torch.full((5, 5), 7.0))
        fs.clear_cache()
        fresh, hit = _forward_counting(fs, w)
        assert not hit
        assert_bitwise_equal(fresh, expected)


def test_reading_results_in_linear_and_conv_does_not_copy_or_invalidate():
    fs = FakeSparsity(make_mask((8, 4, 3, 3), torch.bool))
    w = _weight((8, 4, 3, 3))
    first, _ = _forward_counting(fs, w)
    weight, hit = _forward_counting(fs, w)
    assert hit and weight.data_ptr() == first.data_ptr()
    with torch.no_grad():
        torch.nn.functional.conv2d(torch.randn(2, 4, 6, 6), weight)
        torch.nn.functional.linear(torch.randn(3, 36), weight.view(8, 36))
    again, hit = _forward_counting(fs, w)
    assert hit and again is weight


# ------------------------------------------- calls others must see


def test_tracing_records_the_call():
    fs_module = SparseLinear(torch.nn.Linear(6, 4), make_mask((4, 6), torch.bool))
    x = torch.randn(2, 6)
    with torch.no_grad():
        fs_module(x)
        fs_module(x)  # the cache is warm
        traced = torch.jit.trace(fs_module, x)
    # The trace calls the class (or the operator), not a constant weight.
    graph = str(traced.graph)
    assert 'prim::CallMethod[name="forward"](%weight_sparsity' in graph or "sparsity::fake_sparsity" in graph
    fs_module.weight_sparsity.update_mask(torch.zeros(4, 6, dtype=torch.bool))
    with torch.no_grad():
        assert_bitwise_equal(traced(x), fs_module.bias.expand(2, 4))


def test_dispatch_modes_see_every_call():
    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    fs = FakeSparsity(make_mask((3, 3), torch.bool))
    w = _weight((3, 3))
    _forward_counting(fs, w)
    _forward_counting(fs, w)
    with Recorder() as recorder, torch.no_grad():
        out = fs.forward(w)
        out2 = fs.forward(w)
    assert sum("fake_sparsity" in op for op in recorder.ops) == 2
    assert fs.cache_hits() == 1
    assert_bitwise_equal(out, _expected(fs, w))
    assert_bitwise_equal(out2, _expected(fs, w))


def test_meta_inputs_are_not_cached():
    fs = FakeSparsity(make_mask((3, 3), torch.bool))
    x = torch.empty(3, 3, device="meta")
    for _ in range(2):
        assert fs.forward(x).device.type == "meta"
    assert fs.cache_hits() == 0


@needs_cuda
def test_moves_to_cuda_and_back_invalidate():
    fs = FakeSparsity(make_mask((4, 4), torch.bool))
    w = _weight((4, 4))
    _forward_counting(fs, w)
    wc = w.detach().cuda()
    for _ in range(2):  # CUDA results are not cached
        out, hit = _forward_counting(fs, wc)
        assert not hit and out.is_cuda
        assert_bitwise_equal(out.cpu(), _expected(fs, w).cpu())
    # Back on the CPU: the mask moved, so nothing kept before can match.
    out, hit = _forward_counting(fs, w)
    assert not hit and fs.mask.is_cpu
    assert_bitwise_equal(out, _expected(fs, w))


# ------------------------------------------- threads


def test_concurrent_forwards_and_mask_updates():
    """Scripted loops (which run without the GIL) call forward from several
    threads while another updates the mask. A forward racing with
    update_mask computes with the old mask or the new one, whole, so each
    result is one mask's; once the updates are done, the next result must be
    the last mask's, never a stale kept one. (C++: test_concurrency_stress.cpp,
    8 threads and thousands of updates.)"""
    masks = [make_mask((64, 64), torch.bool) for _ in range(4)]
    fs = FakeSparsity(masks[0].clone())
    w = torch.nn.Parameter(make_x((64, 64), torch.float32, special=False))  # no NaN, so == works
    allowed = [m * w.detach() for m in masks]

    @torch.jit.script
    def loop(fs: torch.classes.sparsity.FakeSparsity, w: torch.Tensor, n: int) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for _ in range(n):
                out.append(fs.forward(w))
        return out

    results, errors = [], []

    def worker():
        try:
            results.extend(loop(fs, w, 300))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(40):
        fs.update_mask(masks[i % 4])
    for t in threads:
        t.join()
    assert not errors
    assert fs.cache_hits() > 0
    assert len(results) == 900
    for r in results:
        assert any(torch.equal(r, a) for a in allowed)
    fs.update_mask(masks[3])
    with torch.no_grad():
        assert_bitwise_equal(fs.forward(w), allowed[3])
