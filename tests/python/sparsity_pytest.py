"""Test helpers that need pytest, kept out of sparsity_testing (which
scripts and the C++ tests' model generators import where pytest may be
missing): the mark for GPU-only cases, the check that the library has CUDA
kernels, and a re-run of a test file under a forced CPU capability."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tests (or parameters) that only mean something on a GPU.
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
    f"built for CUDA {torch.version.cuda})",
)


def check_cuda_kernels():
    # A library built without CUDA would make every GPU test fail with a
    # dispatcher error; say what is wrong instead.
    if not torch._C._dispatch_has_kernel_for_dispatch_key("sparsity::fake_sparsity", "CUDA"):
        pytest.fail("the loaded torch-sparsity library has no CUDA kernels (built with TORCH_SPARSITY_WITH_CUDA=OFF?)")


def run_under_cpu_capability(test_file, capability: str, keyword: str) -> None:
    """Runs the tests of `test_file` selected by `keyword` again in a pytest
    of its own with ATEN_CPU_CAPABILITY forcing `capability`, for the loops
    picked by torch's CPU capability (PyTorch's own kernels follow the same
    setting); skips where the CPU runs another capability when asked."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    reported = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    if reported != capability.upper():
        pytest.skip(f"this CPU runs {reported} when asked for {capability}")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider", "-W", "ignore::FutureWarning",
         "-k", keyword],
        env=env, capture_output=True, text=True, cwd=Path(test_file).parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
