"""Helpers shared by the Python tests (and the script that writes the C++
tests' model files): bitwise and relative comparison, sample inputs, the
memory layouts that reach every kernel path, and small layers whose weights
go through the plugin's FakeSparsity. No pytest here: scripts and the C++
tests' model generators import it (sparsity_pytest has what needs pytest)."""

import functools
import zipfile

import torch
import torch.nn.functional as F

X_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASK_DTYPES = [torch.bool, torch.uint8] + X_DTYPES

_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def assert_bitwise_equal(actual, expected, what=""):
    """Same dtype, shape and device, NaN in the same places, and every other
    element with the same bits (so -0.0 differs from 0.0).

    NaN payloads and signs are not compared: PyTorch's own float16 -> float32
    conversion gives different NaN bits on different CPU paths (its AVX512 path
    turns every NaN into 0x7fffffff, the scalar path keeps sign and payload).
    """
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.device == expected.device, (what, actual.device, expected.device)
    a = actual.detach().contiguous()
    e = expected.detach().contiguous()
    nan_mismatch = torch.zeros_like(a, dtype=torch.bool)
    if a.dtype in _BITS:
        a_nan, e_nan = torch.isnan(a), torch.isnan(e)
        nan_mismatch = a_nan != e_nan
        a = a.view(_BITS[a.dtype]).masked_fill(a_nan & e_nan, 0)
        e = e.view(_BITS[e.dtype]).masked_fill(a_nan & e_nan, 0)
    mismatch = (a != e) | nan_mismatch
    if mismatch.any():
        i = tuple(mismatch.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(mismatch.sum())} of {a.numel()} elements differ; first at {list(i)}: "
            f"{actual[i].item()!r} vs expected {expected[i].item()!r}"
        )


def max_abs_diff(actual, expected):
    assert actual.shape == expected.shape
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def relative_diff(actual, expected):
    """max_abs_diff relative to the largest |value| of `expected`."""
    return max_abs_diff(actual, expected) / max(expected.abs().max().item(), 1e-30)


def assert_outputs_equal(actual, expected, atol=1e-5):
    """Under atol, and under atol relative to the output's size, so that a
    model whose outputs are all tiny still has to match."""
    diff = max_abs_diff(actual, expected)
    scale = max(expected.abs().max().item(), 1e-30)
    assert diff < atol and diff / scale < atol, f"max |diff| {diff} for outputs of size {scale}"


def assert_same_results(actual, expected, rename=lambda name: name):
    """(output, {param: grad}) pairs from forward_backward, bit for bit;
    `rename` maps expected's parameter names to actual's."""
    output, grads = actual
    expected_output, expected_grads = expected
    assert_bitwise_equal(output, expected_output, "output")
    expected_grads = {rename(k): v for k, v in expected_grads.items()}
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        if grad is None:
            assert grads[name] is None, name
        else:
            assert_bitwise_equal(grads[name], grad, name)


_HOOK_TABLES = ["_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_forward_pre_hooks_with_kwargs"]


def module_snapshot(model):
    """What a refused conversion must leave as it was: every module's type,
    hooks, attributes, parameters and buffers (by identity), and a copy of
    the state dict (for assert_module_unchanged)."""
    structure = {
        fqn: (
            type(m),
            {table: [(k, id(v)) for k, v in getattr(m, table).items()] for table in _HOOK_TABLES},
            {k: id(v) for k, v in vars(m).items() if not k.startswith("_")},
            {k: id(v) for k, v in m._parameters.items()},
            {k: id(v) for k, v in m._buffers.items()},
            set(m._non_persistent_buffers_set),
        )
        for fqn, m in model.named_modules()
    }
    return structure, {k: v.clone() for k, v in model.state_dict().items()}


def assert_module_unchanged(model, snapshot):
    structure, state = module_snapshot(model)
    assert structure == snapshot[0]
    assert state.keys() == snapshot[1].keys()
    for key, value in snapshot[1].items():
        if value.device.type == "meta":
            assert state[key].shape == value.shape and state[key].device == value.device, key
        else:
            assert_bitwise_equal(state[key], value, key)


def make_x(shape, dtype, special=True, device="cpu"):
    """Random values with NaN, +-Inf, signed zeros, a subnormal (for float32)
    and a value past float16's range sprinkled in. Drawn on the CPU, so a
    seed gives the same values on every device."""
    x = torch.randn(shape, dtype=torch.float64) * 4
    if special and x.numel() > 0:
        flat = x.view(-1)
        picks = torch.randint(0, flat.numel(), (max(1, flat.numel() // 5),))
        specials = torch.tensor(
            [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, -1.5, 1e-39, 7e4], dtype=torch.float64
        )
        flat[picks] = specials[torch.randint(0, len(specials), (len(picks),))]
    return x.to(dtype).to(device)


def make_mask(shape, dtype, device="cpu", special=False):
    """A 0/1 mask of the given dtype; with special=True floating masks also
    hold other values (0.5, -2, -0.0, NaN, Inf) and uint8 masks hold 2 and 255."""
    keep = torch.rand(shape) > 0.5
    if dtype == torch.bool:
        return keep.to(device)
    mask = keep.to(dtype)
    if special and mask.numel() > 0:
        flat = mask.view(-1)
        picks = torch.randint(0, flat.numel(), (max(1, flat.numel() // 4),))
        if dtype == torch.uint8:
            values = torch.tensor([2, 255], dtype=torch.uint8)
        else:
            values = torch.tensor([0.5, -2.0, -0.0, float("nan"), float("inf")], dtype=torch.float64).to(dtype)
        flat[picks] = values[torch.randint(0, len(values), (len(picks),))]
    return mask.to(device)


# ------------------------------------------------------ FakeSparsity objects


def plugin_weight(shape=(6, 7), dtype=torch.float32):
    """A weight for FakeSparsity tests (the cache tests), with the specials."""
    return torch.nn.Parameter(make_x(shape, dtype))


def held_mask_times(fs, w):
    """What fs.forward(w) must give, from the mask fs holds now."""
    return fs.mask * w.detach()


def forward_counting_hits(fs, w):
    """fs.forward(w) under no_grad, and whether it was a cache hit."""
    hits = fs.cache_hits()
    with torch.no_grad():
        out = fs.forward(w)
    assert fs.cache_hits() - hits in (0, 1)
    return out, fs.cache_hits() > hits


# ------------------------------------------------------ memory layouts
#
# Each takes a contiguous tensor and returns one holding the same values (or,
# for "expanded", values taken from it) in another memory layout: together
# they reach every kernel path (vector loads, misaligned, dense strided,
# strided, broadcast).

# Buffers around views are filled with this, so that a kernel writing outside
# its view shows (the in-place tests compare the whole buffer).
GUARD = 7


def contiguous(t):
    return t.clone()


def offset_by_one(t):
    # Storage offset of one element: data_ptr is not 16-byte aligned. 16
    # guard elements follow the view.
    buffer = torch.full((t.numel() + 17,), GUARD, dtype=t.dtype, device=t.device)
    view = buffer[1 : t.numel() + 1].view(t.shape)
    view.copy_(t)
    return view


def transposed(t):
    order = list(range(t.dim()))[::-1]
    return t.permute(order).contiguous().permute(order)


def stepped(t):
    # Every other element of a tensor twice as long in the last dimension.
    buffer = torch.full(t.shape[:-1] + (2 * t.shape[-1],), GUARD, dtype=t.dtype, device=t.device)
    view = buffer[..., ::2]
    view.copy_(t)
    return view


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def expanded(t):
    # Stride 0 in the first dimension: every row is row 0.
    return t.narrow(0, 0, 1).expand(t.shape)


def layouts_for(shape, for_mask):
    """(name, layout) pairs that apply to a tensor of `shape`; "expanded"
    only for a mask (an expanded x cannot be written in place)."""
    numel = 1
    for size in shape:
        numel *= size
    layouts = [("contiguous", contiguous), ("offset1", offset_by_one)]
    if len(shape) >= 2:
        layouts.append(("transposed", transposed))
    if len(shape) >= 1 and numel > 0:
        layouts.append(("stepped", stepped))
    if len(shape) == 4:
        layouts.append(("channels_last", channels_last))
    if for_mask and len(shape) >= 1 and numel > 0 and shape[0] > 1:
        layouts.append(("expanded", expanded))
    return layouts


def layout_cases(shape, x_dtype, mask_dtype, device):
    """Every x layout against every mask layout of `shape`: yields
    (description, new_x, mask), new_x() giving a fresh x in its layout (an
    in-place test needs two)."""
    x_values = make_x(shape, x_dtype, device=device)
    mask_values = make_mask(shape, mask_dtype, device=device, special=True)
    for x_name, x_layout in layouts_for(shape, for_mask=False):
        for mask_name, mask_layout in layouts_for(shape, for_mask=True):
            what = f"shape {shape}, x {x_name}, mask {mask_name}"
            yield what, functools.partial(x_layout, x_values), mask_layout(mask_values)


class TensorBag(torch.nn.Module):
    """Carries named tensors to C++ as buffers of a scripted module (the C++
    tests and tests/consumer read them with torch::jit::load)."""

    def __init__(self, tensors):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.detach().clone())

    def forward(self):
        return 0


def save_tensor_bag(path, tensors: dict) -> None:
    torch.jit.script(TensorBag(tensors)).save(str(path))


def write_patched_archive(src, dst, old: bytes, new: bytes):
    """Copies a torch.jit.save archive, replacing bytes in its data.pkl: a way
    to make files with malformed or future FakeSparsity states."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                assert old in data, f"{old!r} not in {info.filename}"
                data = data.replace(old, new, 1)
            zout.writestr(info, data)


# Byte patterns of a pickled FakeSparsity state (1, {"mask": tensor}) in data.pkl.
STATE_VERSION_1 = b"FakeSparsity\nq\x04)\x81K\x01"
STATE_PATCHES = {
    "future version": (STATE_VERSION_1, STATE_VERSION_1[:-1] + b"\x07", "format version 7"),
    "missing mask": (b"X\x04\x00\x00\x00mask", b"X\x04\x00\x00\x00mast", "needs a 'mask' entry"),
    "version of wrong type": (
        STATE_VERSION_1,
        STATE_VERSION_1[:-2] + b"X\x01\x00\x00\x001",
        r"FakeSparsity: malformed pickled state: the format version is a value of type str",
    ),
}


# ------------------------------------------------ layers using the plugin


class SmallNet(torch.nn.Module):
    """A Conv2d and a Linear, for 6x6 inputs with 3 channels."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class SparseLinear(torch.nn.Module):
    """A Linear whose weight goes through torch.classes.sparsity.FakeSparsity."""

    def __init__(self, linear: torch.nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_sparsity = torch.classes.sparsity.FakeSparsity(mask)

    def forward(self, x):
        return F.linear(x, self.weight_sparsity.forward(self.weight), self.bias)


class SparseConv2d(torch.nn.Module):
    """A Conv2d (zeros padding) whose weight goes through FakeSparsity."""

    def __init__(self, conv: torch.nn.Conv2d, mask: torch.Tensor):
        super().__init__()
        assert conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.weight_sparsity = torch.classes.sparsity.FakeSparsity(mask)

    def forward(self, x):
        weight = self.weight_sparsity.forward(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def sparsify_with_plugin(model: torch.nn.Module, masks: dict) -> torch.nn.Module:
    """Replaces, in place, each Linear/Conv2d named in masks (module fqn ->
    weight mask) by its plugin-backed counterpart. A test fixture: the real
    converter handles any module type."""
    for fqn, mask in masks.items():
        parent_name, _, child_name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, child_name)
        wrapper = SparseLinear if isinstance(child, torch.nn.Linear) else SparseConv2d
        setattr(parent, child_name, wrapper(child, mask))
    return model


def random_weight_masks(model: torch.nn.Module, dtype=torch.bool, sparsity=0.5) -> dict:
    """A random mask for the weight of every Linear and Conv2d of a model."""
    return {
        name: (torch.rand(m.weight.shape) >= sparsity).to(dtype)
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }
