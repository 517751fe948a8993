"""The installed package (the editable one of scripts/build.sh), used by a C++
program outside this repository's build: find_package(TorchSparsity) with
nothing but torch_sparsity.cmake_prefix_path in CMAKE_PREFIX_PATH, and C++17
asked for by the consumer (the target must raise it to what torch's headers
need). tests/python/test_wheel.py does the same from a built wheel with no
standard set."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch_sparsity

ROOT = Path(__file__).resolve().parents[2]


def run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def build_consumer(work: Path, prefix: str, *cmake_args) -> Path:
    """Configures and builds tests/consumer, copied to `work` so that nothing
    but the installed package can provide the plugin. --as-needed is what
    would drop a library that the program calls nothing from."""
    source = work / "src"
    shutil.copytree(ROOT / "tests" / "consumer", source)
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_PREFIX_PATH", "Torch_DIR")}
    run(
        ["cmake", "-S", source, "-B", work / "build", "-G", "Ninja", f"-DCMAKE_PREFIX_PATH={prefix}",
         "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed", *cmake_args],
        env=env,
    )
    run(["cmake", "--build", work / "build", "--verbose"], env=env)
    return work / "build" / "run_pruned_model"


@pytest.fixture(scope="module")
def consumer_build(tmp_path_factory):
    if torch_sparsity.cmake_prefix_path is None:
        pytest.skip("the library comes from TORCH_SPARSITY_LIBRARY, not from an installed package")
    work = tmp_path_factory.mktemp("consumer")
    program = build_consumer(work, torch_sparsity.cmake_prefix_path, "-DCONSUMER_CXX_STANDARD=17")
    models = work / "models"
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
