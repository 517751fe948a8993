"""The CUDA variant of the build, checked without a GPU: where nvcc and a
CUDA build of torch are present (as on CI), the plugin must register CUDA
kernels, link c10_cuda and carry sm_90 code plus PTX, and that code (read
with cuobjdump) must move x and out 16 bytes per access, use no local memory
and hold kernels for bool and uint8 masks only (aten's mul does the rest)."""

import re
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
@pytest.mark.parametrize("op", ["fake_sparsity", "fake_sparsity_", "fake_structured_sparsity"])
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


@pytest.fixture(scope="module")
def sass_by_function():
    """{mangled kernel name: its SASS} of the plugin, read with cuobjdump
    once for the tests below."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found to disassemble the embedded GPU code")
    sass = subprocess.run([tool, "-sass", torch_sparsity.library_path()], capture_output=True, text=True, check=True).stdout
    functions = {}
    for part in re.split(r"^\s*Function : ", sass, flags=re.MULTILINE)[1:]:
        name, _, body = part.partition("\n")
        functions[name.strip()] = body
    return functions


# The kernels, by the mangled template arguments <elements per pack, out, x,
# mask>: 16 bytes of the widest type per pack, bool (b) or uint8 (h) masks.
FLAT_KERNELS = {
    "float32 x, bool mask": r"apply_mask_flat_kernelILi4EffbE",
    "float32 x, uint8 mask": r"apply_mask_flat_kernelILi4EffhE",
    "float16 x, bool mask": r"apply_mask_flat_kernelILi8EN3c104HalfES\d*_bE",
    "bfloat16 x, bool mask": r"apply_mask_flat_kernelILi8EN3c108BFloat16ES\d*_bE",
    "float64 x, bool mask": r"apply_mask_flat_kernelILi2EddbE",
}


@needs_cuda_build
def test_flat_kernels_load_and_store_16_bytes_at_a_time(sass_by_function):
    # What the memory-bound kernels stand on, read from the machine code
    # without a GPU: x and out move in 128-bit accesses (one pack per
    # access), and a 1-byte mask's four bytes per float32 pack in one
    # 32-bit load, not four byte loads.
    bodies = {}
    for what, pattern in FLAT_KERNELS.items():
        matches = [name for name in sass_by_function if re.search(pattern, name)]
        assert len(matches) == 1, f"{what}: {matches}"
        body = bodies[what] = sass_by_function[matches[0]]
        assert re.search(r"\bLDG\.E(\.\w+)*\.128\b", body), f"{what}: no 128-bit load"
        assert re.search(r"\bSTG\.E(\.\w+)*\.128\b", body), f"{what}: no 128-bit store"
    for what in ["float32 x, bool mask", "float32 x, uint8 mask"]:
        # One byte load is the scalar tail's; a pack read byte by byte
        # would add four per pack.
        byte_loads = re.findall(r"\bLDG\.E(?:\.\w+)*\.[SU]8\b", bodies[what])
        assert len(byte_loads) <= 1, f"{what}: {len(byte_loads)} byte loads"
        assert re.search(r"\bLDG\.E R\d+, ", bodies[what]), f"{what}: no 32-bit mask load"


@needs_cuda_build
def test_no_kernel_uses_local_memory(sass_by_function):
    # Spilled registers or arrays in local memory would add memory traffic
    # to kernels whose speed is their memory traffic (ptxas also warns
    # in the build log).
    assert sass_by_function
    offenders = [name for name, body in sass_by_function.items() if re.search(r"\b(LDL|STL)\b", body)]
    assert not offenders, offenders


@needs_cuda_build
def test_kernels_take_only_byte_masks(sass_by_function):
    # With a floating mask aten's mul is as fast, so no kernel is compiled
    # for one: the template's last argument is bool (b) or uint8 (h).
    kernels = [name for name in sass_by_function if "apply_mask_flat_kernel" in name]
    assert kernels
    assert all(re.search(r"[bh]EEv", name) for name in kernels), kernels
