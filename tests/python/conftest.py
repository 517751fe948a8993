import pytest
import torch

import torch_sparsity  # the installed package (scripts/build.sh); importing it loads the plugin
from cpp_consumer import build_consumer
from sparsity_pytest import check_cuda_kernels, needs_cuda


@pytest.fixture(scope="session")
def installed_consumer(tmp_path_factory):
    """tests/consumer built against the installed package (the folder of its
    programs), found through torch_sparsity.cmake_prefix_path alone, with
    C++17 asked for: the package's target must raise it to torch's standard."""
    if torch_sparsity.cmake_prefix_path is None:
        pytest.skip("the library comes from TORCH_SPARSITY_LIBRARY, not from an installed package")
    work = tmp_path_factory.mktemp("consumer")
    return build_consumer(work, torch_sparsity.cmake_prefix_path, "-DCONSUMER_CXX_STANDARD=17")


@pytest.fixture(scope="module")
def one_thread():
    """For bit-for-bit gradient comparisons: with two threads, convolution's
    backward on this CPU does not repeat its bits at some shapes
    (mobilenet_v3_small on 1x3x32x32: the same eager model's gradients differ
    from one backward to the next); with one it does. Modules use it with
    pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=needs_cuda)])
def device(request):
    """A test written once runs on the CPU and, where one is, on the GPU; its
    ids say which ([cpu], [cuda]), so that `pytest -k cuda` picks the GPU
    cases. On the GPU: deterministic cuDNN, so that a model and its
    converted twin give the same bits in backward too (cuDNN's fastest
    weight gradients add with atomics), and no TF32, so that compiled code
    is held to the CPU's float32 tolerances."""
    if request.param == "cpu":
        yield "cpu"
        return
    check_cuda_kernels()
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32
    cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = True, False, False
    try:
        yield "cuda"
    finally:
        cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return [
        f"torch {torch.__version__}, torch_sparsity {torch_sparsity.__version__} from {torch_sparsity.library_path()}",
        f"CUDA available: {torch.cuda.is_available()}",
    ]
