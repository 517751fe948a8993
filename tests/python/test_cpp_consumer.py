"""The installed package (the editable one of scripts/build.sh), used by a C++
program outside this repository's build: find_package(TorchSparsity) with
nothing but torch_sparsity.cmake_prefix_path in CMAKE_PREFIX_PATH, and C++17
asked for by the consumer (the target must raise it to what torch's headers
need). tests/python/test_wheel.py does the same from a built wheel with no
standard set."""

import os
import sys
from pathlib import Path

import pytest
import torch_sparsity

from cpp_consumer import ROOT, run


@pytest.fixture(scope="module")
def consumer_build(installed_consumer, tmp_path_factory):
    program = installed_consumer / "run_pruned_model"
    models = tmp_path_factory.mktemp("consumer-models")
    run([sys.executable, ROOT / "tests" / "cpp" / "make_python_models.py", "--library", torch_sparsity.library_path(),
         "--out", models])
    return program, models, Path(torch_sparsity.cmake_prefix_path)


def test_installed_package_layout(consumer_build):
    _, _, prefix = consumer_build
    assert (prefix / "lib" / "libtorch_sparsity.so").is_file()
    assert (prefix / "lib" / "cmake" / "TorchSparsity" / "TorchSparsityConfig.cmake").is_file()
    for header in ("ops/fake_sparsity.h", "classes/fake_sparsity_class.h"):
        assert (prefix / "include" / "torch_sparsity" / header).is_file()
    assert os.access(prefix / "bin" / "sparsity_run", os.X_OK)


def test_consumer_asking_for_cxx17_gets_torchs_standard(consumer_build):
    program, _, _ = consumer_build
    log = run(["ninja", "-C", program.parent, "-t", "commands", "run_pruned_model"])
    compile_line = next(line for line in log.splitlines() if "run_pruned_model.cpp" in line)
    assert "-std=c++20" in compile_line or "-std=gnu++20" in compile_line, compile_line


def test_program_links_the_plugin_despite_as_needed(consumer_build):
    program, _, _ = consumer_build
    needed = run(["readelf", "-d", program])
    assert "libtorch_sparsity.so" in needed


@pytest.mark.parametrize("model", ["small_net", "resnet18"])
def test_consumer_runs_model_saved_from_python(consumer_build, model):
    program, models, _ = consumer_build
    out = run([program, models / f"{model}.pt", models / f"{model}_expected.pt"])
    print(out)
    assert "max |C++ - Python| output 0," in out
