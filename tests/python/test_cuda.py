"""What only means something on a GPU: the current stream, inputs on two
devices, more than 2^31 elements, and a model moving its masks to the GPU.
Every other GPU test is written once with the CPU's, in the operator's,
class's or target's own test file (tests taking `device`, ids with
[cuda]). The whole module skips, with the reason, without a GPU."""

import pytest
import torch
from sparsity_pytest import check_cuda_kernels, needs_cuda
from sparsity_testing import assert_bitwise_equal, make_mask, make_x

pytestmark = needs_cuda

fake_sparsity = torch.ops.sparsity.fake_sparsity
fake_sparsity_ = torch.ops.sparsity.fake_sparsity_


@pytest.fixture(scope="module", autouse=True)
def _library_has_cuda_kernels():
    check_cuda_kernels()


def test_runs_on_current_stream():
    # The side stream is kept busy before x is written; a kernel launched on
    # any other stream would read x before that write.
    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is not available in this torch")
    numel = 1 << 22
    source = make_x((numel,), torch.float32, device="cuda")
    mask = make_mask((numel,), torch.bool, device="cuda")
    x = torch.zeros(numel, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        x.copy_(source)
        out = fake_sparsity(x, mask)
    side.synchronize()
    assert_bitwise_equal(out, mask * source, "side stream")


def test_device_mismatch_names_both_devices():
    x = torch.randn(3, 4, device="cuda")
    mask = torch.ones(3, 4, dtype=torch.bool)
    for a, b in [(x, mask), (x.cpu(), mask.cuda())]:
        with pytest.raises(RuntimeError, match=r"(?s)same device.*(cuda:0.*cpu|cpu.*cuda:0)"):
            fake_sparsity(a, b)
    with pytest.raises(RuntimeError, match=r"(?s)cuda:0.*cpu"):
        fake_sparsity_(x, mask)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_devices():
    x0 = torch.randn(3, 4, device="cuda:0")
    mask1 = torch.ones(3, 4, device="cuda:1")
    with pytest.raises(RuntimeError, match=r"(?s)cuda:0.*cuda:1"):
        fake_sparsity(x0, mask1)
    # Inputs on a device that is not the current one: the kernel must run on
    # theirs (device guard), and the result must live there.
    x1 = make_x((1000,), torch.float32, device="cuda:1")
    m1 = make_mask((1000,), torch.bool, device="cuda:1", special=True)
    with torch.cuda.device(0):
        out = fake_sparsity(x1, m1)
        expected = m1 * x1
        y = x1.clone()
        fake_sparsity_(y, m1)
    assert out.device == torch.device("cuda:1")
    assert_bitwise_equal(out, expected, "cuda:1 from current device 0")
    assert_bitwise_equal(y, expected, "cuda:1 in place from current device 0")


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
    mask = torch.tensor([True, False, True], device="cuda")
    expected = x @ (mask.reshape(-1, 1) * model.weight).t()
    assert_bitwise_equal(model(x), expected)
    assert model.sparsity.mask.device.type == "cuda"
