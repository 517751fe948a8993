"""CUDA kernels of sparsity::fake_sparsity and fake_sparsity_.

Every result is compared bit for bit with what PyTorch itself computes on the
GPU (`mask * x`, `x.mul_(mask)`), over every dtype pair and over the memory
layouts that pick different kernel paths: contiguous with 16-byte vector
loads, contiguous but misaligned (one element per load), shared dense
non-contiguous layouts, the strided kernel, more than 25 dimensions, and more
than 2^31 elements. Then the structured operator, and the export target on
the device: eager, torch.export, a torch.compile training step and
AOTInductor packages compiled for the device, against the torch.ao.pruning
model. The whole module skips, with the reason, without a GPU.

With TORCH_SPARSITY_CUDA_TESTS_DEVICE=cpu the same tests run on the CPU
(the few that only mean something on a GPU skip): that checks this file's
own logic (layouts, references, guards) where no GPU is, and
test_cuda_tests_on_cpu.py does it in every test run.
"""

import contextlib
import functools
import io
import os

import pytest
import sparsity_testing
import torch
from sparsity_testing import MASK_DTYPES, X_DTYPES, assert_bitwise_equal
from test_convert import forward_backward, relative_diff
from test_export import assert_compiled_training_matches_eager
from test_export import small_pruned_model as cpu_small_pruned_model

import torch_sparsity
from torch_sparsity import aoti
from torch_sparsity.convert import convert

DEVICE = os.environ.get("TORCH_SPARSITY_CUDA_TESTS_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"

pytestmark = pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(),
    reason=(
        "no CUDA device: torch.cuda.is_available() is False "
        f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    ),
)

# Streams, devices, GPU memory: nothing to check on the CPU.
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA only (TORCH_SPARSITY_CUDA_TESTS_DEVICE=cpu)")

fake_sparsity = torch.ops.sparsity.fake_sparsity
fake_sparsity_ = torch.ops.sparsity.fake_sparsity_

DTYPE_PAIRS = [(x, m) for x in X_DTYPES for m in MASK_DTYPES]


def _pair_id(pair):
    return f"x_{str(pair[0])[6:]}-mask_{str(pair[1])[6:]}"


# 0-d, empty, 1-d to 5-d, sizes that are not multiples of any vector width.
SHAPES = [
    (),
    (0,),
    (3, 0, 2),
    (1,),
    (7,),
    (1029,),
    (4, 33),
    (3, 5, 7),
    (2, 3, 4, 5),
    (2, 1, 3, 5, 3),
]


@pytest.fixture(scope="module", autouse=True)
def _library_has_cuda_kernels():
    # A library built without CUDA would make every test below fail with a
    # dispatcher error; say what is wrong instead.
    if ON_CUDA and not torch._C._dispatch_has_kernel_for_dispatch_key("sparsity::fake_sparsity", "CUDA"):
        pytest.fail("the loaded torch-sparsity library has no CUDA kernels (built with TORCH_SPARSITY_WITH_CUDA=OFF?)")


def make_x(shape, dtype, device=DEVICE):
    return sparsity_testing.make_x(shape, dtype, device=device)


def make_mask(shape, dtype, device=DEVICE):
    return sparsity_testing.make_mask(shape, dtype, device=device, special=True)


# Layouts: each takes a contiguous tensor and returns one holding the same
# values (or, for "expanded", values taken from it) in another memory layout.
def _contiguous(t):
    return t.clone()


# Buffers around views are filled with this, so that a kernel writing
# outside its view shows (the in-place test compares the whole buffer).
_GUARD = 7


def _offset_by_one(t):
    # Storage offset of one element: data_ptr is not 16-byte aligned. 16
    # guard elements follow the view.
    buffer = torch.full((t.numel() + 17,), _GUARD, dtype=t.dtype, device=t.device)
    view = buffer[1 : t.numel() + 1].view(t.shape)
    view.copy_(t)
    return view


def _transposed(t):
    order = list(range(t.dim()))[::-1]
    return t.permute(order).contiguous().permute(order)


def _stepped(t):
    # Every other element of a tensor twice as long in the last dimension.
    buffer = torch.full(t.shape[:-1] + (2 * t.shape[-1],), _GUARD, dtype=t.dtype, device=t.device)
    view = buffer[..., ::2]
    view.copy_(t)
    return view


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def _expanded(t):
    # Stride 0 in the first dimension: every row is row 0.
    return t.narrow(0, 0, 1).expand(t.shape)


def layouts_for(shape, for_mask):
    ndim, numel = len(shape), 1
    for size in shape:
        numel *= size
    layouts = [("contiguous", _contiguous), ("offset1", _offset_by_one)]
    if ndim >= 2:
        layouts.append(("transposed", _transposed))
    if ndim >= 1 and numel > 0:
        layouts.append(("stepped", _stepped))
    if ndim == 4:
        layouts.append(("channels_last", _channels_last))
    if for_mask and ndim >= 1 and numel > 0 and shape[0] > 1:
        layouts.append(("expanded", _expanded))
    return layouts


def parity_cases(x_dtype, mask_dtype):
    """The cases of both parity tests: every shape of SHAPES, every x layout
    against every mask layout. Yields (description, new_x, mask), new_x()
    giving a fresh x in its layout (the in-place test needs two)."""
    for shape in SHAPES:
        x_values = make_x(shape, x_dtype)
        mask_values = make_mask(shape, mask_dtype)
        for x_name, x_layout in layouts_for(shape, for_mask=False):
            for mask_name, mask_layout in layouts_for(shape, for_mask=True):
                what = f"shape {shape}, x {x_name}, mask {mask_name}"
                yield what, functools.partial(x_layout, x_values), mask_layout(mask_values)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_pair_id)
def test_matches_mask_times_x(dtypes):
    for what, new_x, mask in parity_cases(*dtypes):
        x = new_x()
        out = fake_sparsity(x, mask)
        assert_bitwise_equal(out, mask * x, what)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_pair_id)
def test_in_place_matches_mul_(dtypes):
    for what, new_x, mask in parity_cases(*dtypes):
        x, expected = new_x(), new_x()
        x_ptr, x_strides = x.data_ptr(), x.stride()
        # A view's buffer: nothing outside the view may change.
        buffer_before = x._base.clone() if x._base is not None else None
        returned = fake_sparsity_(x, mask)
        expected.mul_(mask)
        assert returned.data_ptr() == x_ptr and returned.stride() == x_strides, what
        assert_bitwise_equal(x, expected, what)
        if buffer_before is not None:
            offset = x.storage_offset() - x._base.storage_offset()
            buffer_before.as_strided(x.shape, x.stride(), offset).copy_(expected)
            assert_bitwise_equal(x._base, buffer_before, f"{what}: the buffer around x")


@pytest.mark.parametrize(
    "x_dtype, mask_dtype",
    [(torch.float32, torch.bool), (torch.float32, torch.float32), (torch.float16, torch.bool), (torch.bfloat16, torch.uint8)],
)
def test_large_tensor(x_dtype, mask_dtype):
    # Many more elements than one wave of the capped grid: every grid-stride
    # loop goes round many times; odd numel leaves a vector tail.
    numel = (1 << 24) + 3
    x, mask = make_x((numel,), x_dtype), make_mask((numel,), mask_dtype)
    assert_bitwise_equal(fake_sparsity(x, mask), mask * x, "flat, aligned")
    assert_bitwise_equal(fake_sparsity(x[1:], mask[1:]), mask[1:] * x[1:], "flat, misaligned")
    # Strided kernel: x transposed, mask row-major.
    xt, maskt = x[: 4096 * 4096].view(4096, 4096).t(), mask[: 4096 * 4096].view(4096, 4096)
    assert_bitwise_equal(fake_sparsity(xt, maskt), maskt * xt, "strided")


def test_more_than_25_dimensions():
    # 26 dimensions of size 2 that no two neighbours can be merged (x's strides
    # are reversed, the mask's are not): the kernel loops over one dimension
    # on the host and runs the strided kernel over the other 25. PyTorch's own
    # CUDA elementwise kernels refuse such a layout ("tensor has too many
    # (>25) dims", pytorch/pytorch#70388), x.contiguous() and mask * x
    # included, so x gets its layout on the CPU (.to keeps a dense layout),
    # the reference is computed from contiguous copies (elementwise, so the
    # layout changes no value), and the results are compared on the CPU.
    shape = (2,) * 26
    order = list(range(26))[::-1]
    x_values = sparsity_testing.make_x(shape, torch.float16)
    x_reversed = x_values.permute(order).contiguous().permute(order)
    x = x_reversed.to(DEVICE)
    assert x.stride() == x_reversed.stride()
    mask = make_mask(shape, torch.bool)
    assert_bitwise_equal(fake_sparsity(x, mask).cpu(), (mask * x_values.to(DEVICE)).cpu(), "26-d")
    expected = x_values.to(DEVICE).mul_(mask)
    fake_sparsity_(x, mask)
    assert_bitwise_equal(x.cpu(), expected.cpu(), "26-d in place")


@cuda_only
def test_runs_on_current_stream():
    # The side stream is kept busy before x is written; a kernel launched on
    # any other stream would read x before that write.
    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is not available in this torch")
    numel = 1 << 22
    source = make_x((numel,), torch.float32)
    mask = make_mask((numel,), torch.bool)
    x = torch.zeros(numel, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        x.copy_(source)
        out = fake_sparsity(x, mask)
    side.synchronize()
    assert_bitwise_equal(out, mask * source, "side stream")


def test_zero_size_inputs_launch_nothing_and_keep_shape():
    for shape in [(0,), (4, 0), (0, 3, 5)]:
        x = torch.empty(shape, device=DEVICE, dtype=torch.float16)
        out = fake_sparsity(x, torch.empty(shape, device=DEVICE, dtype=torch.float32))
        assert out.shape == shape and out.dtype == torch.float32 and out.device.type == DEVICE
        assert fake_sparsity_(x, torch.empty(shape, device=DEVICE, dtype=torch.bool)).shape == shape


def test_in_place_rejects_overlapping_x():
    x = torch.randn(5, device=DEVICE).expand(3, 5)
    with pytest.raises(RuntimeError, match="in place"):
        fake_sparsity_(x, torch.ones(3, 5, device=DEVICE, dtype=torch.bool))
    base = torch.randn(10, device=DEVICE)
    with pytest.raises(RuntimeError):
        fake_sparsity_(base[:6], base[2:8])


@cuda_only
def test_device_mismatch_names_both_devices():
    x = torch.randn(3, 4, device="cuda")
    mask = torch.ones(3, 4, dtype=torch.bool)
    for a, b in [(x, mask), (x.cpu(), mask.cuda())]:
        with pytest.raises(RuntimeError, match=r"(?s)same device.*(cuda:0.*cpu|cpu.*cuda:0)"):
            fake_sparsity(a, b)
    with pytest.raises(RuntimeError, match=r"(?s)cuda:0.*cpu"):
        fake_sparsity_(x, mask)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(RuntimeError, match=r"\[3, 4\].*\[4, 3\]|\[4, 3\].*\[3, 4\]"):
        fake_sparsity(torch.randn(3, 4, device=DEVICE), torch.ones(4, 3, device=DEVICE))


@cuda_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_devices():
    x0 = torch.randn(3, 4, device="cuda:0")
    mask1 = torch.ones(3, 4, device="cuda:1")
    with pytest.raises(RuntimeError, match=r"(?s)cuda:0.*cuda:1"):
        fake_sparsity(x0, mask1)
    # Inputs on a device that is not the current one: the kernel must run on
    # theirs (device guard), and the result must live there.
    x1 = make_x((1000,), torch.float32, device="cuda:1")
    m1 = make_mask((1000,), torch.bool, device="cuda:1")
    with torch.cuda.device(0):
        out = fake_sparsity(x1, m1)
        expected = m1 * x1
        y = x1.clone()
        fake_sparsity_(y, m1)
    assert out.device == torch.device("cuda:1")
    assert_bitwise_equal(out, expected, "cuda:1 from current device 0")
    assert_bitwise_equal(y, expected, "cuda:1 in place from current device 0")


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = torch.randn(4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    torch.autograd.gradcheck(fake_sparsity, (x, mask))
    torch.autograd.gradgradcheck(fake_sparsity, (x, mask))
    # Non-contiguous x, bool mask (no gradient for it).
    xt = torch.randn(5, 4, dtype=torch.float64, device=DEVICE).t().requires_grad_()
    bool_mask = torch.rand(4, 5, device=DEVICE) > 0.5
    torch.autograd.gradcheck(lambda a: fake_sparsity(a, bool_mask), (xt,))
    torch.autograd.gradgradcheck(lambda a: fake_sparsity(a, bool_mask), (xt,))


def test_in_place_gradcheck_and_gradgradcheck():
    x = torch.randn(4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = torch.randn(4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def in_place(a, m):
        return fake_sparsity_(a.clone(), m)

    torch.autograd.gradcheck(in_place, (x, mask))
    torch.autograd.gradgradcheck(in_place, (x, mask))


def test_backward_values_on_the_device():
    x = make_x((6, 7), torch.float32).nan_to_num().requires_grad_()
    mask = (torch.rand(6, 7, device=DEVICE) > 0.5).float().requires_grad_()
    grad = torch.randn(6, 7, device=DEVICE)
    fake_sparsity(x, mask).backward(grad)
    assert x.grad.device.type == DEVICE and mask.grad.device.type == DEVICE
    assert_bitwise_equal(x.grad, grad * mask.detach(), "dx")
    assert_bitwise_equal(mask.grad, grad * x.detach(), "dmask")


def test_opcheck():
    samples = [
        (torch.randn(3, 4, device=DEVICE), torch.rand(3, 4, device=DEVICE) > 0.5),
        (torch.randn(3, 4, device=DEVICE, requires_grad=True), torch.rand(3, 4, device=DEVICE, requires_grad=True)),
        (torch.randn(4, 3, device=DEVICE, dtype=torch.float16).t(), torch.rand(3, 4, device=DEVICE)),
    ]
    for x, mask in samples:
        torch.library.opcheck(fake_sparsity.default, (x, mask))
        # torch.compile cannot functionalize a custom op whose output aliases
        # an input (the SPEC's "-> Tensor(a!)"), so no aot_dispatch test here.
        torch.library.opcheck(
            fake_sparsity_.default,
            (x.detach().clone(), mask),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


class _MaskedAdd(torch.nn.Module):
    """forward(x) = FakeSparsity(mask).forward(x) + bias."""

    def __init__(self, mask):
        super().__init__()
        self.sparsity = torch.classes.sparsity.FakeSparsity(mask)
        self.bias = torch.nn.Parameter(torch.randn(mask.shape[-1]))

    def forward(self, x):
        return self.sparsity.forward(x) + self.bias


def test_scripted_module_moved_with_cuda():
    mask = torch.rand(3, 8) > 0.5
    module = torch.jit.script(_MaskedAdd(mask))
    x = make_x((3, 8), torch.float32).nan_to_num()
    moved = module.to(DEVICE)
    out = moved(x)
    assert out.device.type == DEVICE
    assert_bitwise_equal(out, mask.to(DEVICE) * x + module.bias, f"after .to({DEVICE!r})")


def test_scripted_module_loaded_with_map_location_cuda():
    mask = torch.rand(3, 8) > 0.5
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(_MaskedAdd(mask)), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer, map_location=DEVICE)
    x = make_x((3, 8), torch.float32).nan_to_num()
    out = loaded(x)
    assert out.device.type == DEVICE and loaded.bias.device.type == DEVICE
    assert_bitwise_equal(out, mask.to(DEVICE) * x + loaded.bias, f"after jit.load(map_location={DEVICE!r})")


@cuda_only
def test_more_than_2_pow_31_elements():
    # Offsets past 2^31 in the flat kernel (and in place), the vector tail at
    # the very end, and the strided kernel. About 19 GB at peak.
    free_bytes, _ = torch.cuda.mem_get_info()
    if free_bytes < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free_bytes / 2**30:.1f} GiB free")
    numel = 2**31 + 18
    try:
        x = torch.randn(numel, dtype=torch.float16, device="cuda")
        mask = torch.randint(0, 2, (numel,), dtype=torch.uint8, device="cuda").bool()
        expected = mask * x
        out = fake_sparsity(x, mask)
        for part in [slice(0, 4096), slice(2**31 - 4096, 2**31 + 4096), slice(numel - 4096, numel)]:
            assert_bitwise_equal(out[part], expected[part], f"elements {part.start}..{part.stop}")
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), "some element differs"
        del out

        # Strided: x column-major, mask row-major, offsets up to ~2^31.
        xs, ms = x.view(2, numel // 2).t(), mask.view(numel // 2, 2)
        out = fake_sparsity(xs, ms)
        expected_strided = ms * xs
        assert_bitwise_equal(out[-4096:], expected_strided[-4096:], "strided tail")
        assert torch.equal(out.view(torch.int16), expected_strided.view(torch.int16)), "strided: some element differs"
        del out, expected_strided

        fake_sparsity_(x, mask)
        assert_bitwise_equal(x[-4096:], expected[-4096:], "in-place tail")
        assert torch.equal(x.view(torch.int16), expected.view(torch.int16)), "in place: some element differs"
    finally:
        x = mask = expected = xs = ms = out = expected_strided = None
        torch.cuda.empty_cache()


# ------------------------------------------------- fake_structured_sparsity

fake_structured_sparsity = torch.ops.sparsity.fake_structured_sparsity


def _row_reference(x, mask):
    return mask.reshape(-1, *([1] * (x.dim() - 1))) * x


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_pair_id)
def test_structured_matches_row_mask_times_x(dtypes):
    """The row mask goes through fake_sparsity's kernels expanded with
    stride 0: every shape (0-d excluded: a row mask needs dim 0) and x
    layout, against a contiguous and a stepped mask."""
    x_dtype, mask_dtype = dtypes
    for shape in SHAPES:
        if not shape:
            continue
        x_values = make_x(shape, x_dtype)
        mask_values = make_mask(shape[:1], mask_dtype)
        for x_name, x_layout in layouts_for(shape, for_mask=False):
            for mask_name, mask_layout in [("contiguous", _contiguous), ("stepped", _stepped)]:
                if mask_name == "stepped" and shape[0] == 0:
                    continue
                x, mask = x_layout(x_values), mask_layout(mask_values)
                what = f"structured, shape {shape}, x {x_name}, mask {mask_name}"
                assert_bitwise_equal(fake_structured_sparsity(x, mask), _row_reference(x, mask), what)


def test_structured_gradcheck_and_gradients_on_the_device():
    x = torch.randn(4, 3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    torch.autograd.gradcheck(fake_structured_sparsity, (x, mask))
    torch.autograd.gradgradcheck(fake_structured_sparsity, (x, mask))
    x32 = make_x((6, 7), torch.float32).nan_to_num().requires_grad_()
    m32 = (torch.rand(6, device=DEVICE) > 0.5).float().requires_grad_()
    grad = torch.randn(6, 7, device=DEVICE)
    fake_structured_sparsity(x32, m32).backward(grad)
    x_ref, m_ref = x32.detach().clone().requires_grad_(), m32.detach().clone().requires_grad_()
    _row_reference(x_ref, m_ref).backward(grad)
    assert_bitwise_equal(x32.grad, x_ref.grad, "dx")
    assert_bitwise_equal(m32.grad, m_ref.grad, "dmask")


def test_structured_opcheck_and_errors():
    torch.library.opcheck(
        fake_structured_sparsity.default, (torch.randn(3, 4, device=DEVICE), torch.rand(3, device=DEVICE) > 0.5)
    )
    with pytest.raises(RuntimeError, match=r"mask shape \[4\] must be \[x.size\(0\)\]"):
        fake_structured_sparsity(torch.randn(3, 4, device=DEVICE), torch.ones(4, device=DEVICE))


@cuda_only
def test_structured_class_follows_its_model_to_the_gpu():
    class RowPruned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 4))
            self.sparsity = torch.classes.sparsity.FakeStructuredSparsity(torch.tensor([True, False, True]))

        def forward(self, x):
            return x @ self.sparsity.forward(self.weight).t()

    model = torch.jit.script(RowPruned()).cuda()
    x = torch.randn(2, 4, device="cuda")
    expected = x @ _row_reference(model.weight, torch.tensor([True, False, True], device="cuda")).t()
    assert_bitwise_equal(model(x), expected)
    assert model.sparsity.mask.device.type == "cuda"


# --------------------------------- export, torch.compile and AOTInductor on the device
#
# The export target (convert(model, target="export")) on the device: the
# eager twin, torch.export (saved and loaded), a torch.compile training
# step, and AOTInductor packages compiled for the device, run and given a
# new mask. Against the model torch.ao.pruning made, moved to the device.

@pytest.fixture(scope="module", autouse=True)
def _exact_cudnn():
    # Deterministic cuDNN algorithms, so that a model and its converted twin
    # give the same bits in backward too (cuDNN's fastest weight gradients
    # add with atomics); no TF32, so that compiled code is held to the CPU
    # tests' float32 tolerances. Neither matters to the kernels above.
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = True, False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.backends.cuda.matmul.allow_tf32 = saved[2]


PRUNINGS = ["weight_norm", "structured"]


def small_pruned_model(pruning):
    """test_export's small model, pruned on the CPU, moved to the device."""
    return cpu_small_pruned_model(pruning).to(DEVICE)


def device_input(batch=4):
    return torch.randn(batch, 3, 6, 6).to(DEVICE)


@contextlib.contextmanager
def eager_mask_set_to(model, fqn, values):
    """The pruned model with the torch.ao.pruning mask of `fqn` (a
    FakeSparsity or FakeStructuredSparsity parametrization) holding `values`
    for the duration. (torch's structured bias hook zeroes the biases of
    pruned rows in place: those stay zero afterwards.)"""
    module_fqn, _, name = fqn.rpartition(".")
    mask = getattr(model.get_submodule(module_fqn).parametrizations, name)[0].mask
    saved = mask.clone()
    mask.copy_(values)
    try:
        yield
    finally:
        mask.copy_(saved)


@pytest.mark.parametrize("pruning", PRUNINGS)
def test_export_target_on_the_device_equals_the_pruned_model_bit_for_bit(pruning):
    model = small_pruned_model(pruning).eval()
    converted = convert(model, target="export")
    assert all(mask.device.type == DEVICE for mask in torch_sparsity.masks(converted).values())
    x = device_input()
    output, grads = forward_backward(converted, [x])
    eager_output, eager_grads = forward_backward(model, [x])
    assert_bitwise_equal(output, eager_output, "output")
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        # The structured pruner's bias hook adds a parameter of its own (_bias).
        assert (grad is None) == (grads[name] is None), name
        if grad is not None:
            assert_bitwise_equal(grads[name], grad, f"gradient of {name}")


@pytest.mark.parametrize("pruning", PRUNINGS)
def test_exported_program_on_the_device_runs_saves_loads_and_follows_its_masks(pruning, tmp_path):
    model = small_pruned_model(pruning).eval()
    converted = convert(model, target="export")
    x = device_input()
    with torch.no_grad():
        expected = model(x)
    program = torch.export.export(converted, (x,))
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    operator = torch.ops.sparsity.fake_sparsity if pruning == "weight_norm" else fake_structured_sparsity
    assert operator.default in calls, calls
    path = tmp_path / "pruned.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    for form, program_ in (("exported", program), ("loaded", loaded)):
        module = program_.module()
        with torch.no_grad():
            assert_bitwise_equal(module(x), expected, form)
        mask = torch_sparsity.masks(program_)["4.weight"]
        assert mask.device.type == DEVICE, form
        saved = mask.clone()
        try:
            mask.zero_()
            with torch.no_grad(), eager_mask_set_to(model, "4.weight", mask):
                changed, eager_changed = module(x), model(x)
            assert_bitwise_equal(changed, eager_changed, form)
            assert not torch.equal(changed, expected), form
        finally:
            mask.copy_(saved)
        with torch.no_grad():
            assert_bitwise_equal(module(x), expected, form)


@pytest.mark.parametrize("pruning", PRUNINGS)
def test_compiled_training_steps_on_the_device_give_the_pruned_models_weights(pruning):
    """Three SGD steps with momentum, the export-target model under
    torch.compile against the eager pruned model (test_export's check).
    Tolerance 1e-4 relative: the compiled BatchNorm statistics and weight
    gradients add in another order than ATen's, more so on a GPU; a dropped
    mask or gradient is off by the size of the weights."""
    converted = assert_compiled_training_matches_eager(small_pruned_model(pruning).train(), device_input, 1e-4)
    assert all(p.grad.device.type == DEVICE for p in converted.parameters() if p.grad is not None)


# (pruning, fold_masks): the masked weights folded when loaded and after a
# set_mask (the default), or the operator's device kernel called on every
# run through AOTInductor's proxy executor.
@pytest.fixture(scope="module", params=[("weight_norm", True), ("weight_norm", False), ("structured", True)],
                ids=["folded", "operator", "structured-folded"])
def device_package(request, tmp_path_factory):
    pruning, fold_masks = request.param
    model = small_pruned_model(pruning).eval()
    converted = convert(model, target="export")
    x = device_input(2)
    path = aoti.compile(converted, (x,), tmp_path_factory.mktemp("aoti-device") / f"{pruning}.pt2",
                        fold_masks=fold_masks)
    return model, x, path


def test_aoti_package_for_the_device_runs_as_the_pruned_model(device_package):
    model, x, path = device_package
    runner = aoti.load(path)
    with torch.no_grad():
        out, expected = runner(x), model(x)
    assert out.device == x.device
    assert relative_diff(out, expected) <= 1e-5
    for fqn in runner.mask_names():
        assert runner.mask(fqn).device == x.device, fqn


def test_aoti_package_for_the_device_takes_a_new_mask(device_package):
    model, x, path = device_package
    runner = aoti.load(path)
    fqn = "4.weight"
    held = runner.mask(fqn)
    new_mask = torch.rand(held.shape).to(DEVICE) > 0.7
    with torch.no_grad():
        before = runner(x)
    runner.set_mask(fqn, new_mask)
    assert torch.equal(runner.mask(fqn), new_mask)
    with torch.no_grad(), eager_mask_set_to(model, fqn, new_mask):
        after, expected = runner(x), model(x)
    assert relative_diff(after, expected) <= 1e-5
    assert relative_diff(after, before) > 1e-3
    # A mask on another device is refused and changes nothing.
    elsewhere = new_mask.to("meta" if DEVICE == "cpu" else "cpu")
    with pytest.raises(RuntimeError, match=rf"is on {DEVICE}.*, got a mask on {elsewhere.device.type}"):
        runner.set_mask(fqn, elsewhere)
    assert torch.equal(runner.mask(fqn), new_mask)
    # Back to the first mask: the first output again. (Not model(x): the
    # structured pruner's bias hook zeroed the eager biases of the rows the
    # new mask pruned, in place, for good.)
    runner.set_mask(fqn, held)
    with torch.no_grad():
        assert relative_diff(runner(x), before) <= 1e-5
