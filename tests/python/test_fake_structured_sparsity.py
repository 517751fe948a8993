"""sparsity::fake_structured_sparsity and torch.classes.sparsity.FakeStructuredSparsity
against what torch.ao.pruning's FakeStructuredSparsity computes,
mask.reshape(-1, 1, ...) * x, bit for bit, on the CPU and (tests taking
`device`) on the GPU where one is."""

import copy
import io
import itertools
import os
import re
import zipfile

import pytest
import torch
from sparsity_pytest import run_under_cpu_capability
from sparsity_testing import (
    MASK_DTYPES,
    X_DTYPES,
    assert_bitwise_equal,
    contiguous,
    layouts_for,
    make_mask,
    make_x,
    stepped,
    write_patched_archive,
)

fake_structured_sparsity = torch.ops.sparsity.fake_structured_sparsity

SHAPES = [
    (0,), (1,), (7,), (1029,), (0, 3), (3, 0), (5, 3), (4, 33), (33, 65), (4, 3000), (3, 0, 2), (2, 3, 4), (3, 5, 7),
    (2, 3, 4, 5), (2, 1, 3, 4, 5), (2, 1, 3, 5, 3),
]


def rows(mask, x):
    """torch.ao.pruning's reading of a row mask."""
    return mask.reshape(-1, *([1] * (x.dim() - 1)))


def reference(x, mask):
    return rows(mask, x) * x


@pytest.mark.parametrize("x_dtype,mask_dtype", list(itertools.product(X_DTYPES, MASK_DTYPES)))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_row_mask_times_x(device, shape, x_dtype, mask_dtype):
    """The row mask goes through fake_sparsity's kernels expanded with
    stride 0: every x layout, against a contiguous and a stepped mask."""
    x_values = make_x(shape, x_dtype, device=device)
    mask_values = make_mask(shape[:1], mask_dtype, device=device, special=True)
    mask_layouts = [("contiguous", contiguous)] + [("stepped", stepped)] * (shape[0] > 0)
    for x_name, x_layout in layouts_for(shape, for_mask=False):
        for mask_name, mask_layout in mask_layouts:
            x, mask = x_layout(x_values), mask_layout(mask_values)
            what = f"x {x_name}, mask {mask_name}"
            x_before, mask_before = x.clone(), mask.clone()
            assert_bitwise_equal(fake_structured_sparsity(x, mask), reference(x, mask), what)
            assert_bitwise_equal(x, x_before, what)
            assert_bitwise_equal(mask, mask_before, what)


def test_zero_rows_of_inf_and_nan_give_nan_and_keep_signs():
    x = torch.tensor([[float("inf"), float("nan"), -3.0], [3.0, float("-inf"), -0.0]])
    out = fake_structured_sparsity(x, torch.tensor([False, False]))
    assert torch.isnan(out[0, :2]).all() and torch.isnan(out[1, 1])
    assert torch.signbit(out[0, 2]) and not torch.signbit(out[1, 0]) and torch.signbit(out[1, 2])
    assert_bitwise_equal(out, reference(x, torch.tensor([False, False])))


def _layouts():
    base = make_x((6, 8, 10), torch.float32)
    yield "transposed", base.transpose(0, 2), make_mask((10,), torch.bool)
    yield "inner dims transposed", base.transpose(1, 2), make_mask((6,), torch.float32, special=True)
    yield "sliced with step", base[::2, 1::3, ::4], make_mask((3,), torch.uint8, special=True)
    yield "mask with a step", base, make_mask((12,), torch.float16, special=True)[::2]
    yield "storage offset", base.view(-1)[3:403].view(20, 20), make_mask((25,), torch.bool)[5:]
    yield "expanded x", base[:, :1].expand(6, 8, 10), make_mask((6,), torch.bool)
    yield "channels last", make_x((4, 3, 5, 6), torch.bfloat16).contiguous(
        memory_format=torch.channels_last
    ), make_mask((4,), torch.float32, special=True)
    yield "large transposed", make_x((300, 400), torch.float32).t(), make_mask((400,), torch.bool)


@pytest.mark.parametrize("name,x,mask", list(_layouts()), ids=lambda v: v if isinstance(v, str) else "")
def test_any_layout(name, x, mask):
    assert_bitwise_equal(fake_structured_sparsity(x, mask), reference(x, mask))


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_large_tensors_across_threads(mask_dtype):
    # Rows longer than the kernel's mask block, shorter than a thread's share,
    # and an odd tail; then many short rows.
    torch.set_num_threads(2)
    for shape in [(37, 5000 * 3 + 1), (300000, 3), (3, (1 << 20) + 5)]:
        x = make_x(shape, torch.float32)
        mask = make_mask(shape[:1], mask_dtype, special=True)
        assert_bitwise_equal(fake_structured_sparsity(x, mask), reference(x, mask))


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_every_16bit_value(x_dtype):
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(x_dtype)
    x = values.reshape(256, 256)
    for mask in (torch.rand(256) > 0.5, torch.tensor([0.5, -2.0, float("nan"), 1.0]).repeat(64).to(x_dtype)):
        assert_bitwise_equal(fake_structured_sparsity(x, mask), reference(x, mask))


@pytest.mark.skipif("ATEN_CPU_CAPABILITY" in os.environ, reason="already running under a forced capability")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_each_cpu_capability_path(capability):
    run_under_cpu_capability(__file__, capability, "16bit_value or matches_row_mask or any_layout")


# ---------------------------------------------------------------- autograd


def test_gradcheck_and_gradgradcheck_float64(device):
    for shape in [(4,), (4, 5), (4, 3, 2), (3, 2, 2, 3)]:
        x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
        for mask in (torch.rand(shape[0], dtype=torch.float64), torch.randn(shape[0], dtype=torch.float64)):
            mask = mask.to(device).requires_grad_()
            assert torch.autograd.gradcheck(fake_structured_sparsity, (x, mask))
            assert torch.autograd.gradgradcheck(fake_structured_sparsity, (x, mask))
    bool_mask = torch.tensor([True, False, True, True], device=device)
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fake_structured_sparsity(t, bool_mask), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fake_structured_sparsity(t, bool_mask), (x,))


@pytest.mark.parametrize("x_dtype,mask_dtype", list(itertools.product(X_DTYPES, [torch.bool, torch.float32])))
def test_gradients_match_the_reference(device, x_dtype, mask_dtype):
    # (6, 7): x with the specials but NaN (Inf turned into the largest finite value).
    for shape, special in [((6, 4, 3), False), ((6, 7), True)]:
        x = make_x(shape, x_dtype, special=special, device=device).nan_to_num().requires_grad_()
        mask = make_mask(shape[:1], mask_dtype, device=device)
        if mask.dtype.is_floating_point:
            mask.requires_grad_()
        grad = make_x(shape, torch.promote_types(x_dtype, mask_dtype), special=False, device=device)
        ours = torch.autograd.grad(fake_structured_sparsity(x, mask), [x] + [mask] * mask.requires_grad, grad)
        theirs = torch.autograd.grad(reference(x, mask), [x] + [mask] * mask.requires_grad, grad)
        for a, b in zip(ours, theirs):
            assert a.device.type == device
            assert_bitwise_equal(a, b, str(shape))


def test_no_grad_and_inference_mode():
    x = torch.randn(3, 4, requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        assert not fake_structured_sparsity(x, mask).requires_grad
    with torch.inference_mode():
        assert_bitwise_equal(fake_structured_sparsity(x, mask), reference(x, mask))


# Samples of (x, mask) for opcheck, made on a device: (name, make(device)).
OPCHECK_SAMPLES = {
    "bool": lambda d: (torch.randn(4, 3, device=d), torch.rand(4, device=d) > 0.5),
    "bf16-float": lambda d: (torch.randn(4, 3, 2, dtype=torch.bfloat16, device=d), torch.rand(4, device=d)),
    "transposed": lambda d: (torch.randn(5, 4, device=d).t(), torch.rand(4, dtype=torch.float16, device=d)),
    "grad": lambda d: (torch.randn(4, 3, device=d, requires_grad=True), torch.rand(4, device=d, requires_grad=True)),
    "empty": lambda d: (torch.randn(0, 3, device=d), torch.rand(0, device=d)),
}


@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES))
def test_opcheck(device, sample):
    torch.library.opcheck(fake_structured_sparsity.default, OPCHECK_SAMPLES[sample](device))


# --------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "x,mask,message",
    [
        (torch.randn(3, 2), torch.ones(2), r"mask shape \[2\] must be \[x.size\(0\)\] for x of shape \[3, 2\]"),
        (torch.randn(3, 2), torch.ones(3, 2), r"mask shape \[3, 2\] must be \[x.size\(0\)\]"),
        (torch.tensor(1.0), torch.ones(1), r"x must have at least one dimension"),
        (torch.ones(3, 2, dtype=torch.int32), torch.ones(3), r"x must be a floating tensor"),
        (torch.randn(3, 2), torch.ones(3, dtype=torch.int64), r"mask must be bool, uint8 or floating"),
    ],
    ids=["short mask", "full mask", "0-d x", "int x", "int64 mask"],
)
def test_bad_input_is_a_clear_error(device, x, mask, message):
    with pytest.raises(RuntimeError, match=message):
        fake_structured_sparsity(x.to(device), mask.to(device))


@pytest.mark.parametrize(
    "x,mask,message",
    [
        (torch.randn(3, 2), torch.ones(3, device="meta"), r"same device, but x is on cpu and mask is on meta"),
        # A sparse operand has no kernel: the dispatcher's own error.
        (torch.randn(3, 2).to_sparse(), torch.ones(3), r"Could not run 'sparsity::fake_structured_sparsity' with "
         r"arguments from the 'SparseCPU' backend"),
        (torch.randn(3, 2), torch.ones(3).to_sparse(), r"Could not run 'sparsity::fake_structured_sparsity' with "
         r"arguments from the 'SparseCPU' backend"),
    ],
    ids=["devices", "sparse x", "sparse mask"],
)
def test_bad_layout_or_device_is_a_clear_error(x, mask, message):
    with pytest.raises(RuntimeError, match=message):
        fake_structured_sparsity(x, mask)


def test_meta_kernel_shapes_and_dtypes():
    for x_dtype, mask_dtype in itertools.product(X_DTYPES, MASK_DTYPES):
        x = torch.empty(4, 3, 2, dtype=x_dtype, device="meta")
        out = fake_structured_sparsity(x, torch.empty(4, dtype=mask_dtype, device="meta"))
        assert out.device.type == "meta" and out.shape == x.shape
        assert out.dtype == torch.promote_types(x_dtype, mask_dtype)
    with pytest.raises(RuntimeError, match=r"must be \[x.size\(0\)\]"):
        fake_structured_sparsity(torch.empty(4, 3, device="meta"), torch.empty(3, device="meta"))


# ------------------------------------------------------------------- class

FakeStructuredSparsity = torch.classes.sparsity.FakeStructuredSparsity


def test_class_forward_mask_identity_and_update():
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    holder = FakeStructuredSparsity(mask)
    x = make_x((4, 5), torch.float32)
    assert_bitwise_equal(holder.forward(x), reference(x, mask))
    assert holder.mask is not None and holder.mask.data_ptr() == mask.data_ptr()
    holder.mask[3] = 0  # an in-place edit of the held mask changes the next forward
    assert_bitwise_equal(holder.forward(x), reference(x, torch.tensor([1.0, 0.0, 1.0, 0.0])))
    holder.update_mask(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert holder.mask.data_ptr() == mask.data_ptr()
    assert_bitwise_equal(holder.forward(x), reference(x, torch.tensor([0.0, 1.0, 1.0, 1.0])))
    assert holder.state_dict() == {}
    assert holder.sparsity_level() == 0.25


def test_class_bad_masks_are_refused_and_change_nothing():
    with pytest.raises(RuntimeError, match=r"FakeStructuredSparsity: mask must be 1-d, one entry per slice"):
        FakeStructuredSparsity(torch.ones(2, 2))
    holder = FakeStructuredSparsity(torch.tensor([True, False, True]))
    for bad, message in [
        (torch.ones(4, dtype=torch.bool), r"FakeStructuredSparsity.update_mask: new mask shape \[4\] must equal"),
        (torch.ones(3, 1), r"FakeStructuredSparsity.update_mask: mask must be 1-d"),
        (torch.ones(3, dtype=torch.int64), r"FakeStructuredSparsity.update_mask: mask must be bool"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            holder.update_mask(bad)
        assert torch.equal(holder.mask, torch.tensor([True, False, True]))
    with pytest.raises(RuntimeError, match=r"must be \[x.size\(0\)\]"):
        holder.forward(torch.randn(4, 2))


def test_class_cache_answers_until_the_mask_changes():
    holder = FakeStructuredSparsity(torch.tensor([True, False, True]))
    x = make_x((3, 1000), torch.float32)
    with torch.no_grad():
        first = holder.forward(x)
        second = holder.forward(x)
        assert holder.cache_hits() == 1
        assert_bitwise_equal(second, first)
        holder.mask[1] = True
        assert_bitwise_equal(holder.forward(x), x.clone())
        assert holder.cache_hits() == 1


class RowPrunedLinear(torch.nn.Module):
    def __init__(self, linear, mask):
        super().__init__()
        self.weight_original = linear.weight
        self.bias = linear.bias
        self.weight_sparsity = FakeStructuredSparsity(mask)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight_sparsity.forward(self.weight_original), self.bias)


def test_scripted_module_saves_loads_and_deep_copies(tmp_path):
    torch.manual_seed(0)
    mask = torch.tensor([True, False, True])
    module = torch.jit.script(RowPrunedLinear(torch.nn.Linear(4, 3), mask))
    x = torch.randn(2, 4)
    expected = torch.nn.functional.linear(x, reference(module.weight_original, mask), module.bias)
    assert_bitwise_equal(module(x), expected)
    path = tmp_path / "row_pruned.pt"
    torch.jit.save(module, path)
    loaded = torch.jit.load(path)
    assert_bitwise_equal(loaded(x), expected)
    assert torch.equal(loaded.weight_sparsity.mask, mask)
    copied = copy.deepcopy(loaded)
    copied.weight_sparsity.mask[0] = False  # the copy has a mask of its own
    assert torch.equal(loaded.weight_sparsity.mask, mask)
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    assert_bitwise_equal(torch.jit.load(buffer)(x), expected)


def test_gradient_through_the_class_reaches_the_weight():
    torch.manual_seed(0)
    mask = torch.tensor([True, False, True])
    linear = torch.nn.Linear(4, 3)
    module = torch.jit.script(RowPrunedLinear(linear, mask))
    x = torch.randn(2, 4)
    module(x).sum().backward()
    weight = linear.weight.detach().clone().requires_grad_()
    torch.nn.functional.linear(x, reference(weight, mask), linear.bias.detach()).sum().backward()
    assert_bitwise_equal(module.weight_original.grad, weight.grad)


def _state_patches(data: bytes):
    """(old, new, message) byte patches of a saved FakeStructuredSparsity state."""
    version = re.search(rb"FakeStructuredSparsity\nq.\)\x81K\x01", data, re.DOTALL).group(0)
    return {
        "future version": (version, version[:-1] + b"\x07", r"FakeStructuredSparsity: cannot load a pickled state "
                           r"of format version 7"),
        "missing mask": (b"X\x04\x00\x00\x00mask", b"X\x04\x00\x00\x00mast",
                         r"FakeStructuredSparsity: malformed pickled state: version 1 needs a 'mask' entry"),
    }


@pytest.mark.parametrize("case", ["future version", "missing mask"])
def test_bad_pickled_state_is_a_clear_error(tmp_path, case):
    good = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(RowPrunedLinear(torch.nn.Linear(4, 3), torch.ones(3))), good)
    with zipfile.ZipFile(good) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    old, new, message = _state_patches(data)[case]
    write_patched_archive(good, tmp_path / "bad.pt", old, new)
    with pytest.raises(RuntimeError, match=message):
        torch.jit.load(tmp_path / "bad.pt")
    torch.jit.load(good)
