import pytest
import torch

import torch_sparsity  # the installed package (scripts/build.sh); importing it loads the plugin


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return [
        f"torch {torch.__version__}, torch_sparsity {torch_sparsity.__version__} from {torch_sparsity.library_path()}",
        f"CUDA available: {torch.cuda.is_available()}",
    ]
