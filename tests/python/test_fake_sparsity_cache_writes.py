"""FakeSparsity.forward's inference cache (continued from
test_fake_sparsity_cache.py): results that callers write to, calls that
others (tracing, dispatch modes) must see, moves between devices, and
threads."""

import threading

import pytest
import torch
from sparsity_pytest import needs_cuda
from sparsity_testing import (
    SparseLinear,
    assert_bitwise_equal,
    forward_counting_hits,
    held_mask_times,
    make_mask,
    make_x,
    plugin_weight,
)
from torch.utils._python_dispatch import TorchDispatchMode

FakeSparsity = torch.classes.sparsity.FakeSparsity


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
    w = plugin_weight((5, 5))
    expected = held_mask_times(fs, w)
    forward_counting_hits(fs, w)
    result, hit = forward_counting_hits(fs, w)
    assert hit
    with torch.no_grad():
        change(result)
    fresh, hit = forward_counting_hits(fs, w)
    assert not hit and fresh is not result
    assert_bitwise_equal(fresh, expected)
    again, hit = forward_counting_hits(fs, w)
    assert hit and again is fresh


def test_writes_that_bypass_version_counters_are_not_seen_until_clear_cache():
    """The documented limit (docs/performance.md): a write through .data or
    .numpy() changes no version counter, so the cache cannot see it; hits
    then hand out what was written, until clear_cache()."""
    for bypass in (lambda r: r.data.fill_(7), lambda r: r.numpy().__setitem__(slice(None), 7)):
        fs = FakeSparsity(make_mask((5, 5), torch.bool))
        w = plugin_weight((5, 5))
        expected = held_mask_times(fs, w)
        result, _ = forward_counting_hits(fs, w)
        bypass(result)
        stale, hit = forward_counting_hits(fs, w)
        assert hit and torch.equal(stale, torch.full((5, 5), 7.0))
        fs.clear_cache()
        fresh, hit = forward_counting_hits(fs, w)
        assert not hit
        assert_bitwise_equal(fresh, expected)


def test_reading_results_in_linear_and_conv_does_not_copy_or_invalidate():
    fs = FakeSparsity(make_mask((8, 4, 3, 3), torch.bool))
    w = plugin_weight((8, 4, 3, 3))
    first, _ = forward_counting_hits(fs, w)
    weight, hit = forward_counting_hits(fs, w)
    assert hit and weight.data_ptr() == first.data_ptr()
    with torch.no_grad():
        torch.nn.functional.conv2d(torch.randn(2, 4, 6, 6), weight)
        torch.nn.functional.linear(torch.randn(3, 36), weight.view(8, 36))
    again, hit = forward_counting_hits(fs, w)
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
    w = plugin_weight((3, 3))
    forward_counting_hits(fs, w)
    forward_counting_hits(fs, w)
    with Recorder() as recorder, torch.no_grad():
        out = fs.forward(w)
        out2 = fs.forward(w)
    assert sum("fake_sparsity" in op for op in recorder.ops) == 2
    assert fs.cache_hits() == 1
    assert_bitwise_equal(out, held_mask_times(fs, w))
    assert_bitwise_equal(out2, held_mask_times(fs, w))


def test_meta_inputs_are_not_cached():
    fs = FakeSparsity(make_mask((3, 3), torch.bool))
    x = torch.empty(3, 3, device="meta")
    for _ in range(2):
        assert fs.forward(x).device.type == "meta"
    assert fs.cache_hits() == 0


@needs_cuda
def test_moves_to_cuda_and_back_invalidate():
    fs = FakeSparsity(make_mask((4, 4), torch.bool))
    w = plugin_weight((4, 4))
    forward_counting_hits(fs, w)
    wc = w.detach().cuda()
    for _ in range(2):  # CUDA results are not cached
        out, hit = forward_counting_hits(fs, wc)
        assert not hit and out.is_cuda
        assert_bitwise_equal(out.cpu(), held_mask_times(fs, w).cpu())
    # Back on the CPU: the mask moved, so nothing kept before can match.
    out, hit = forward_counting_hits(fs, w)
    assert not hit and fs.mask.is_cpu
    assert_bitwise_equal(out, held_mask_times(fs, w))


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
