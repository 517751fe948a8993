"""sparsity::fake_sparsity and fake_sparsity_ against mask * x, bit for bit,
on the CPU and (tests taking `device`) on the GPU where one is: every dtype
pair, the memory layouts that pick different kernel paths, autograd,
opcheck and bad input. What only a GPU has (streams, two devices, 2^31
elements) is in test_cuda.py."""

import itertools
import os

import pytest
import torch
from sparsity_pytest import run_under_cpu_capability
from sparsity_testing import MASK_DTYPES, X_DTYPES, assert_bitwise_equal, layout_cases, make_mask, make_x

fake_sparsity = torch.ops.sparsity.fake_sparsity
fake_sparsity_ = torch.ops.sparsity.fake_sparsity_

# 0-d, empty, 1-d to 5-d, sizes that are not multiples of any vector width.
SHAPES = [
    (), (0,), (3, 0, 2), (1,), (7,), (1029,), (5, 3), (4, 33), (33, 65), (2, 3, 4), (3, 5, 7), (2, 3, 4, 5),
    (2, 1, 3, 4, 5), (2, 1, 3, 5, 3),
]
DTYPE_PAIRS = list(itertools.product(X_DTYPES, MASK_DTYPES))


@pytest.mark.parametrize("x_dtype,mask_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_mask_times_x(device, shape, x_dtype, mask_dtype):
    for what, new_x, mask in layout_cases(shape, x_dtype, mask_dtype, device):
        x = new_x()
        x_before, mask_before = x.clone(), mask.clone()
        assert_bitwise_equal(fake_sparsity(x, mask), mask * x, what)
        # The inputs are untouched.
        assert_bitwise_equal(x, x_before, what)
        assert_bitwise_equal(mask, mask_before, what)


@pytest.mark.parametrize("x_dtype,mask_dtype", DTYPE_PAIRS)
def test_inplace_matches_mul_(device, x_dtype, mask_dtype):
    for shape in SHAPES:
        for what, new_x, mask in layout_cases(shape, x_dtype, mask_dtype, device):
            x, expected = new_x(), new_x()
            version = x._version
            # A view's buffer: nothing outside the view may change.
            buffer_before = x._base.clone() if x._base is not None else None
            result = fake_sparsity_(x, mask)
            expected.mul_(mask)
            assert result is x, what
            assert x._version > version, what
            assert_bitwise_equal(x, expected, what)
            if buffer_before is not None:
                offset = x.storage_offset() - x._base.storage_offset()
                buffer_before.as_strided(x.shape, x.stride(), offset).copy_(expected)
                assert_bitwise_equal(x._base, buffer_before, f"{what}: the buffer around x")


def test_zero_times_inf_and_nan_is_nan_and_signs_kept():
    x = torch.tensor([float("inf"), float("nan"), -3.0, 3.0, float("-inf"), -0.0])
    mask = torch.zeros(6, dtype=torch.bool)
    out = fake_sparsity(x, mask)
    assert torch.isnan(out[:2]).all() and torch.isnan(out[4])
    assert torch.signbit(out[2]) and not torch.signbit(out[3]) and torch.signbit(out[5])
    assert_bitwise_equal(out, mask * x)


def _noncontiguous_cases():
    base = make_x((6, 8, 10), torch.float32)
    mask = make_mask((6, 8, 10), torch.bool)
    yield "transposed", base.transpose(0, 2), mask.transpose(0, 2)
    yield "x transposed, mask contiguous", base.transpose(1, 2), mask.transpose(1, 2).contiguous()
    yield "sliced with step", base[::2, 1::3, ::4], mask[::2, 1::3, ::4]
    yield "storage offset", base.view(-1)[3:403].view(20, 20), mask.view(-1)[5:405].view(20, 20)
    yield "expanded mask", base, mask[:1].expand(6, 8, 10)
    yield "expanded x", base[:, :1].expand(6, 8, 10), mask
    yield "channels last", make_x((2, 3, 5, 4), torch.float32).contiguous(memory_format=torch.channels_last), make_mask(
        (2, 3, 5, 4), torch.uint8
    ).contiguous(memory_format=torch.channels_last)
    yield "channels last x, plain mask", make_x((2, 3, 5, 4), torch.float16).contiguous(
        memory_format=torch.channels_last
    ), make_mask((2, 3, 5, 4), torch.float32)
    big = make_x((300, 400), torch.float32)
    yield "large transposed", big.t(), make_mask((400, 300), torch.float32)


@pytest.mark.parametrize("name,x,mask", list(_noncontiguous_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_noncontiguous(name, x, mask):
    out = fake_sparsity(x, mask)
    assert_bitwise_equal(out, mask * x)
    if not (x.stride() and 0 in x.stride()):
        y = x.clone()
        assert fake_sparsity_(y, mask) is y
        assert_bitwise_equal(y, x.clone().mul_(mask))


@pytest.mark.parametrize(
    "x_dtype,mask_dtype",
    [(torch.float32, m) for m in MASK_DTYPES] + [(torch.float16, torch.bool), (torch.bfloat16, torch.uint8)],
)
def test_large_tensor(device, x_dtype, mask_dtype):
    # Many tasks per CPU thread, and many more elements than one wave of the
    # GPU's capped grid (every grid-stride loop goes round many times); the
    # odd numel leaves a vector tail.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        numel = (1 << 24) + 3
        x, mask = make_x((numel,), x_dtype, device=device), make_mask((numel,), mask_dtype, device=device)
        assert_bitwise_equal(fake_sparsity(x, mask), mask * x, "flat, aligned")
        assert_bitwise_equal(fake_sparsity(x[1:], mask[1:]), mask[1:] * x[1:], "flat, misaligned")
        # Strided: x transposed, mask row-major.
        xt, maskt = x[: 4096 * 4096].view(4096, 4096).t(), mask[: 4096 * 4096].view(4096, 4096)
        assert_bitwise_equal(fake_sparsity(xt, maskt), maskt * xt, "strided")
    finally:
        torch.set_num_threads(threads)


def test_more_than_25_dimensions(device):
    # 26 dimensions of size 2 that no two neighbours can be merged (x's strides
    # are reversed, the mask's are not): the GPU kernel loops over one
    # dimension on the host and runs the strided kernel over the other 25.
    # PyTorch's own CUDA elementwise kernels refuse such a layout ("tensor has
    # too many (>25) dims", pytorch/pytorch#70388), x.contiguous() and
    # mask * x included, so x gets its layout on the CPU (.to keeps a dense
    # layout), the reference is computed from contiguous copies (elementwise,
    # so the layout changes no value), and the results are compared on the CPU.
    shape = (2,) * 26
    order = list(range(26))[::-1]
    x_values = make_x(shape, torch.float16)
    x_reversed = x_values.permute(order).contiguous().permute(order)
    x = x_reversed.to(device)
    assert x.stride() == x_reversed.stride()
    mask = make_mask(shape, torch.bool, device=device, special=True)
    assert_bitwise_equal(fake_sparsity(x, mask).cpu(), (mask * x_values.to(device)).cpu(), "26-d")
    expected = x_values.to(device).mul_(mask)
    fake_sparsity_(x, mask)
    assert_bitwise_equal(x.cpu(), expected.cpu(), "26-d in place")


def test_zero_size_inputs_launch_nothing_and_keep_shape(device):
    for shape in [(0,), (4, 0), (0, 3, 5)]:
        x = torch.empty(shape, device=device, dtype=torch.float16)
        out = fake_sparsity(x, torch.empty(shape, device=device, dtype=torch.float32))
        assert out.shape == shape and out.dtype == torch.float32 and out.device.type == device
        assert fake_sparsity_(x, torch.empty(shape, device=device, dtype=torch.bool)).shape == shape


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_results_past_32_mib_advised_huge_pages(x_dtype):
    # Results of 32 MiB or more get transparent huge pages advised before the
    # kernel writes them; a size that is no multiple of 2 MiB, and a view that
    # starts mid-page, leave 4 KiB pages at the ends.
    n = (1 << 24) + (1 << 18) + 7
    x = make_x((n,), x_dtype)
    for mask_dtype in (torch.bool, torch.float32):
        mask = make_mask((n,), mask_dtype)
        out = fake_sparsity(x, mask)
        assert out.untyped_storage().nbytes() >= 32 << 20
        assert_bitwise_equal(out, mask * x)
        assert_bitwise_equal(fake_sparsity(x[5:], mask[5:]), mask[5:] * x[5:])


def test_output_layout_follows_x():
    x = make_x((2, 3, 5, 4), torch.float32).contiguous(memory_format=torch.channels_last)
    mask = make_mask((2, 3, 5, 4), torch.bool).contiguous(memory_format=torch.channels_last)
    assert fake_sparsity(x, mask).stride() == (mask * x).stride()


# ------------------------------------------------- float16 and bfloat16

# Mask values for floating masks: exact, rounding, overflowing, underflowing
# into denormals, and the specials.
_MASK_VALUES = [0.0, 1.0, -0.0, 0.5, -2.0, 3.0, 0.1, 1e-3, 1e30, 6e-8, 1e-40, float("nan"), float("inf")]


def _every_bit_pattern(dtype):
    """All 65536 values of a 16-bit float type: NaNs, infinities, denormals, both zeros."""
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


def _mask_for(x, dtype):
    n = x.numel()
    if dtype == torch.bool:
        return torch.rand(n) > 0.5
    if dtype == torch.uint8:
        return torch.arange(n).remainder(256).to(torch.uint8)
    return torch.tensor(_MASK_VALUES).repeat(n // len(_MASK_VALUES) + 1)[:n].to(dtype)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_every_16bit_value_times_every_kind_of_mask(x_dtype, mask_dtype):
    # Every x value against each mask value, plus an odd tail, so that the
    # vector loops, their tails and the thread split all see every case.
    values = _every_bit_pattern(x_dtype)
    x = torch.cat([values.repeat_interleave(len(_MASK_VALUES) if mask_dtype.is_floating_point else 2), values[:13]])
    mask = _mask_for(x, mask_dtype)
    assert_bitwise_equal(fake_sparsity(x, mask), mask * x)
    y = x.clone()
    fake_sparsity_(y, mask)
    assert_bitwise_equal(y, x.clone().mul_(mask))


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16])
def test_float_x_times_16bit_mask(mask_dtype):
    values = _every_bit_pattern(mask_dtype)
    x = torch.cat([torch.randn(len(values)) * 1e-38, torch.randn(len(values)) * 1e5, torch.randn(77)])
    x[::97] = float("nan")
    x[1::89] = float("-inf")
    mask = torch.cat([values, values.flip(0), values[:77]])
    assert_bitwise_equal(fake_sparsity(x, mask), mask * x)
    y = x.clone()
    fake_sparsity_(y, mask)
    assert_bitwise_equal(y, x.clone().mul_(mask))


@pytest.mark.skipif("ATEN_CPU_CAPABILITY" in os.environ, reason="already running under a forced capability")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_each_cpu_capability_path(capability):
    """The float16/bfloat16 loops are picked from torch's CPU capability:
    run the bit-exactness tests again with ATEN_CPU_CAPABILITY forcing the
    narrower paths (PyTorch's mask * x follows the same setting)."""
    run_under_cpu_capability(
        __file__, capability, "16bit or 16bit_mask or matches_mask_times_x or inplace_matches_mul_ or noncontiguous"
    )


# ---------------------------------------------------------------- autograd


def test_gradcheck_and_gradgradcheck_float64(device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    for mask in (torch.rand(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)):
        mask = mask.to(device).requires_grad_()
        assert torch.autograd.gradcheck(fake_sparsity, (x, mask))
        assert torch.autograd.gradgradcheck(fake_sparsity, (x, mask))
    bool_mask = torch.rand(4, 5, device=device) > 0.5
    assert torch.autograd.gradcheck(lambda t: fake_sparsity(t, bool_mask), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fake_sparsity(t, bool_mask), (x,))
    # Non-contiguous x, with a float mask and with a bool mask.
    xt = torch.randn(5, 4, dtype=torch.float64, device=device).t().requires_grad_()
    assert torch.autograd.gradcheck(fake_sparsity, (xt, mask))
    assert torch.autograd.gradcheck(lambda t: fake_sparsity(t, bool_mask), (xt,))
    assert torch.autograd.gradgradcheck(lambda t: fake_sparsity(t, bool_mask), (xt,))


def test_inplace_gradcheck_float64(device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)

    def inplace(a, m):
        return fake_sparsity_(a.clone(), m)

    assert torch.autograd.gradcheck(inplace, (x, mask))
    assert torch.autograd.gradgradcheck(inplace, (x, mask))


def test_backward_values(device):
    x = make_x((6, 7), torch.float32, device=device).nan_to_num().requires_grad_()
    mask = (torch.rand(6, 7, device=device) > 0.5).float().requires_grad_()
    grad = torch.randn(6, 7, device=device)
    fake_sparsity(x, mask).backward(grad)
    assert x.grad.device.type == device and mask.grad.device.type == device
    assert_bitwise_equal(x.grad, grad * mask.detach(), "dx")
    assert_bitwise_equal(mask.grad, grad * x.detach(), "dmask")


@pytest.mark.parametrize("x_dtype,mask_dtype", list(itertools.product(X_DTYPES, MASK_DTYPES)))
def test_gradients_match_mask_times_x(x_dtype, mask_dtype):
    x = make_x((5, 6), x_dtype, special=False).requires_grad_()
    mask = make_mask((5, 6), mask_dtype)
    if mask.dtype.is_floating_point:
        mask = (mask + torch.rand(5, 6).to(mask_dtype)).requires_grad_()
    grad = make_x((5, 6), torch.promote_types(x_dtype, mask_dtype), special=False)

    ours = torch.autograd.grad(fake_sparsity(x, mask), [t for t in (x, mask) if t.requires_grad], grad)
    ref = torch.autograd.grad(mask * x, [t for t in (x, mask) if t.requires_grad], grad)
    for a, b in zip(ours, ref):
        assert_bitwise_equal(a, b)


def test_double_backward_matches_mask_times_x():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (fake_sparsity, lambda a, m: m * a):
        (gx,) = torch.autograd.grad((fn(x, mask) ** 2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.sum(), (x, mask)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inplace_autograd_matches_mul_():
    base = torch.randn(4, 4, requires_grad=True)
    mask = torch.rand(4, 4, requires_grad=True)
    grads = []
    for fn in (fake_sparsity_, torch.Tensor.mul_):
        y = base * 2
        out = fn(y, mask)
        assert out is y
        grads.append(torch.autograd.grad((out * out).sum(), (base, mask)))
    for a, b in zip(*grads):
        assert_bitwise_equal(a, b)


def test_inplace_on_leaf_requiring_grad_is_refused_and_changes_nothing():
    x = torch.randn(3, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="leaf"):
        fake_sparsity_(x, torch.zeros(3, dtype=torch.bool))
    assert_bitwise_equal(x.detach(), before)
    with torch.no_grad():
        fake_sparsity_(x, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(x.detach(), torch.zeros(3))


def test_inference_mode():
    with torch.inference_mode():
        x = torch.randn(10)
        mask = torch.rand(10) > 0.5
        assert_bitwise_equal(fake_sparsity(x, mask), mask * x)
        fake_sparsity_(x, mask)


# ---------------------------------------------------------------- opcheck


# Samples of (x, mask) for opcheck, made on a device: (name, make(device)).
OPCHECK_SAMPLES = {
    "bool": lambda d: (torch.randn(3, 4, device=d), torch.rand(3, 4, device=d) > 0.5),
    "grad-x": lambda d: (torch.randn(3, 4, device=d, requires_grad=True), torch.rand(3, 4, device=d)),
    "grad-both": lambda d: (torch.randn(3, 4, device=d, requires_grad=True), torch.rand(3, 4, device=d, requires_grad=True)),
    "float64-grad-both": lambda d: (
        torch.randn(2, 3, dtype=torch.float64, device=d, requires_grad=True),
        torch.rand(2, 3, dtype=torch.float64, device=d, requires_grad=True),
    ),
    "f16-float": lambda d: (torch.randn(2, 3, dtype=torch.float16, device=d), torch.rand(2, 3, device=d)),
    "f16-transposed-float": lambda d: (torch.randn(4, 3, dtype=torch.float16, device=d).t(), torch.rand(3, 4, device=d)),
    "transposed-uint8": lambda d: (torch.randn(5, 6, device=d).t(), torch.randint(0, 2, (6, 5), dtype=torch.uint8, device=d)),
    "empty": lambda d: (torch.randn(0, 3, device=d), torch.ones(0, 3, dtype=torch.bool, device=d)),
}


@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES))
def test_opcheck(device, sample):
    torch.library.opcheck(fake_sparsity.default, OPCHECK_SAMPLES[sample](device))


INPLACE_SAMPLES = {
    "bool": lambda d: (torch.randn(3, 4, device=d), torch.rand(3, 4, device=d) > 0.5),
    "bf16-float": lambda d: (torch.randn(3, 4, dtype=torch.bfloat16, device=d), torch.rand(3, 4, device=d)),
    "transposed": lambda d: (torch.randn(4, 3, device=d).t(), torch.rand(3, 4, dtype=torch.float64, device=d)),
    "f16-transposed-float": OPCHECK_SAMPLES["f16-transposed-float"],
}


@pytest.mark.parametrize("sample", list(INPLACE_SAMPLES))
def test_opcheck_inplace(device, sample):
    # The SPEC fixes the schema "-> Tensor(a!)"; torch.compile cannot
    # functionalize a custom op whose output aliases an input, so opcheck's
    # aot_dispatch test is checked separately below.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(fake_sparsity_.default, INPLACE_SAMPLES[sample](device), test_utils=utils)


def test_opcheck_inplace_aot_dispatch_is_a_known_torch_limitation():
    with pytest.raises(Exception, match="output has alias annotations"):
        torch.library.opcheck(fake_sparsity_.default, INPLACE_SAMPLES["bool"]("cpu"), test_utils="test_aot_dispatch_dynamic")


# ---------------------------------------------------------------- bad input


def _assert_refused(fn, x, mask, *patterns):
    """fn(x, mask) raises with every pattern in its message and changes nothing."""
    x_before, mask_before = x.clone(), mask.clone()
    with pytest.raises(RuntimeError) as info:
        fn(x, mask)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    assert torch.equal(x, x_before) or torch.isnan(x).any()
    assert_bitwise_equal(x, x_before) if x.dtype.is_floating_point else None
    assert torch.equal(mask, mask_before)


@pytest.mark.parametrize("fn", [fake_sparsity, fake_sparsity_], ids=["out-of-place", "in-place"])
def test_shape_mismatch_names_both_shapes(device, fn):
    x = torch.randn(3, 4, device=device)
    for mask_dtype in (torch.bool, torch.float32):
        _assert_refused(fn, x, torch.ones(4, 3, dtype=mask_dtype, device=device), "[4, 3]", "[3, 4]", "shape")
    # No broadcasting, even where mask * x would broadcast.
    _assert_refused(fn, x, torch.ones(1, 4, dtype=torch.bool, device=device), "[1, 4]", "[3, 4]")
    _assert_refused(fn, x, torch.ones((), dtype=torch.bool, device=device), "[]", "[3, 4]")


@pytest.mark.parametrize("fn", [fake_sparsity, fake_sparsity_], ids=["out-of-place", "in-place"])
def test_different_devices_names_both(fn):
    x = torch.randn(3)
    with pytest.raises(RuntimeError, match=r"same device.*cpu.*meta|same device.*meta.*cpu"):
        fn(x, torch.ones(3, device="meta"))
    with pytest.raises(RuntimeError, match=r"same device.*meta.*cpu"):
        fn(torch.ones(3, device="meta"), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("fn", [fake_sparsity, fake_sparsity_], ids=["out-of-place", "in-place"])
def test_unsupported_dtypes(fn):
    _assert_refused(fn, torch.arange(4), torch.ones(4, dtype=torch.bool), "x must be a floating tensor", "Long")
    _assert_refused(fn, torch.randn(4), torch.ones(4, dtype=torch.int32), "mask must be bool, uint8 or floating", "Int")
    _assert_refused(fn, torch.randn(4, dtype=torch.complex64), torch.ones(4), "x must be a floating tensor")


def test_sparse_input_is_refused():
    x = torch.randn(3, 3).to_sparse()
    with pytest.raises(RuntimeError):
        fake_sparsity(x, torch.ones(3, 3, dtype=torch.bool))


def test_inplace_overlap_is_refused(device):
    x = torch.randn(1, 4, device=device).expand(3, 4)
    before = x.clone()
    with pytest.raises(RuntimeError, match="(?s)memory location.*in place"):
        fake_sparsity_(x, torch.zeros(3, 4, dtype=torch.bool, device=device))
    assert torch.equal(x, before)
    storage = torch.randn(10, device=device)
    x, mask = storage[:6], storage[2:8]
    before = storage.clone()
    with pytest.raises(RuntimeError, match="memory location"):
        fake_sparsity_(x, mask)
    assert torch.equal(storage, before)
    # Fully aliased mask is fine, as for x.mul_(x).
    y = torch.randn(5, device=device)
    expected = y.clone().mul_(y.clone())
    assert_bitwise_equal(fake_sparsity_(y, y), expected)


def test_meta_kernel_shapes_and_dtypes():
    for x_dtype, mask_dtype in itertools.product(X_DTYPES, MASK_DTYPES):
        x = torch.empty(2, 3, 4, dtype=x_dtype, device="meta")
        mask = torch.empty(2, 3, 4, dtype=mask_dtype, device="meta")
        out = fake_sparsity(x, mask)
        assert out.device.type == "meta" and out.shape == x.shape
        assert out.dtype == torch.promote_types(x_dtype, mask_dtype)
        assert fake_sparsity_(x, mask) is x
    with pytest.raises(RuntimeError, match="must equal x shape"):
        fake_sparsity(torch.empty(2, device="meta"), torch.empty(3, device="meta"))
