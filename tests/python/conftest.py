import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import torch_sparsity  # noqa: E402

torch_sparsity.load_library()


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return [
        f"torch {torch.__version__}, library {torch_sparsity.library_path()}",
        f"CUDA available: {torch.cuda.is_available()}",
    ]
