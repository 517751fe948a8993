"""The installed package, used by a C++ program outside this repository's
build through find_package(TorchSparsity)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch_sparsity

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def consumer_build(tmp_path_factory):
    build_dir = Path(torch_sparsity.library_path()).parent
    if not (build_dir / "CMakeCache.txt").is_file():
        pytest.skip(f"{build_dir} is not a CMake build directory, nothing to install")
    work = tmp_path_factory.mktemp("consumer")
    prefix = work / "install"
    _run(["cmake", "--install", build_dir, "--prefix", prefix])
    # Copied out of the repository, so nothing but the installed package can
    # provide the plugin. --as-needed is what would drop a library that the
    # program calls nothing from.
    source = work / "src"
    shutil.copytree(ROOT / "tests" / "consumer", source)
    _run(
        [
            "cmake",
            "-S",
            source,
            "-B",
            work / "build",
            "-G",
            "Ninja",
            f"-DCMAKE_PREFIX_PATH={prefix};{torch.utils.cmake_prefix_path}",
            "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed",
        ]
        + ([f"-DCMAKE_CUDA_COMPILER={os.environ['CUDACXX']}"] if os.environ.get("CUDACXX") else [])
    )
    _run(["cmake", "--build", work / "build"])
    models = work / "models"
    _run([sys.executable, ROOT / "tests" / "cpp" / "make_python_models.py", "--library", torch_sparsity.library_path(), "--out", models])
    return work / "build" / "run_pruned_model", models, prefix


def test_installed_package_layout(consumer_build):
    _, _, prefix = consumer_build
    assert (prefix / "lib" / "libtorch_sparsity.so").is_file()
    assert (prefix / "lib" / "cmake" / "TorchSparsity" / "TorchSparsityConfig.cmake").is_file()
    for header in ("ops/fake_sparsity.h", "classes/fake_sparsity_class.h"):
        assert (prefix / "include" / "torch_sparsity" / header).is_file()


def test_program_links_the_plugin_despite_as_needed(consumer_build):
    program, _, prefix = consumer_build
    needed = _run(["readelf", "-d", program])
    assert "libtorch_sparsity.so" in needed


@pytest.mark.parametrize("model", ["small_net", "resnet18"])
def test_consumer_runs_model_saved_from_python(consumer_build, model):
    program, models, _ = consumer_build
    out = _run([program, models / f"{model}.pt", models / f"{model}_expected.pt"])
    print(out)
    assert "max |C++ - Python| output 0," in out
