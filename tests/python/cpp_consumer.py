"""Builds tests/consumer, the C++ programs that use the installed package
from outside this repository's build (test_cpp_consumer.py, test_aoti.py,
test_wheel.py)."""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def build_consumer(work: Path, prefix: str, *cmake_args) -> Path:
    """Configures and builds tests/consumer, copied to `work` so that nothing
    but the installed package can provide the plugin, and returns the build
    folder (run_pruned_model, run_pruned_package). --as-needed is what would
    drop a library that the program calls nothing from."""
    source = work / "src"
    shutil.copytree(ROOT / "tests" / "consumer", source)
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_PREFIX_PATH", "Torch_DIR")}
    run(
        ["cmake", "-S", source, "-B", work / "build", "-G", "Ninja", f"-DCMAKE_PREFIX_PATH={prefix}",
         "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed", *cmake_args],
        env=env,
    )
    run(["cmake", "--build", work / "build", "--verbose"], env=env)
    return work / "build"
