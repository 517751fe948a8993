"""The CUDA variant of the build, checked without a GPU: where nvcc and a
CUDA build of torch are present (as on CI), the plugin must register CUDA
kernels, link c10_cuda and carry sm_90 code plus PTX."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch_sparsity

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
needs_cuda_build = pytest.mark.skipif(
    NVCC is None or torch.version.cuda is None,
    reason=f"no CUDA build here (nvcc: {NVCC}, torch CUDA: {torch.version.cuda})",
)


def _cuobjdump():
    candidates = [shutil.which("cuobjdump"), str(Path(NVCC).resolve().parent / "cuobjdump") if NVCC else None]
    try:  # the triton wheel that comes with CUDA builds of torch carries one
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).is_file()), None)


@needs_cuda_build
@pytest.mark.parametrize("op", ["fake_sparsity", "fake_sparsity_"])
def test_cuda_kernels_are_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsity::{op}", "CUDA")


@needs_cuda_build
def test_plugin_links_c10_cuda():
    dynamic = subprocess.run(["readelf", "-d", torch_sparsity.library_path()], capture_output=True, text=True).stdout
    assert "libc10_cuda.so" in dynamic


@needs_cuda_build
def test_plugin_carries_sm90_code_and_ptx():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found to list the embedded GPU code")
    listing = subprocess.run(
        [tool, "--list-elf", "--list-ptx", torch_sparsity.library_path()], capture_output=True, text=True, check=True
    ).stdout
    assert "sm_90.cubin" in listing, listing
    assert ".sm_90.ptx" in listing, listing
