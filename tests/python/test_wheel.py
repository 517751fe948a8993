"""The wheel a user builds: `pip wheel --no-build-isolation .` from this
checkout, installed into a fresh virtual environment that has nothing but the
wheel and the packages of this test run's own environment (torch, torchvision
and their dependencies, linked in; never this checkout's package nor its
editable install: only the tests' own helper module is read from the
checkout), and used from a folder outside the checkout: import, the operator
and the class, a torchvision model pruned, converted, scripted and saved,
the sparsity_run program on it, and a C++ consumer that sets no C++ standard
and finds everything through torch_sparsity.cmake_prefix_path alone.

The wheel is built once per run, in a temporary folder (about three minutes
here, CUDA kernels included when nvcc is present)."""

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from cpp_consumer import build_consumer, run

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # CMake's own build folder goes in the temporary folder too, so the
    # checkout's build/ is neither read nor touched.
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", out / "dist",
         "-C", f"build-dir={out / 'cmake-build'}", ROOT],
        timeout=1500,
    )
    (path,) = (out / "dist").glob("torch_sparsity-*.whl")
    return path


def installed_closure(*names):
    """The distributions of this environment that `names` need to run, them
    included (requirements behind an extra, or for another platform and so
    not installed, are left out)."""
    found, todo = {}, list(names)
    while todo:
        key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(key)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[key] = dist
        todo += [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in dist.requires or [] if "extra ==" not in r]
    return list(found.values())


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory):
    """A new venv: the wheel installed by its own pip, then torch,
    torchvision and what they need linked in from this environment, nothing
    else (no pytest, no scikit-build-core, no torch_sparsity but the wheel's)."""
    env_dir = tmp_path_factory.mktemp("fresh") / "venv"
    run([sys.executable, "-m", "venv", env_dir])
    python = env_dir / "bin" / "python"
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", wheel])
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    linked = set()
    for dist in installed_closure("torch", "torchvision"):
        for top in {Path(f).parts[0] for f in dist.files or []}:
            if top not in ("..", "__pycache__") and (ours / top).exists() and not (site / top).exists():
                (site / top).symlink_to(ours / top)
                linked.add(top)
    assert {"torch", "torchvision", "sympy"} <= linked and not any("sparsity" in t or "pytest" in t for t in linked)
    work = tmp_path_factory.mktemp("outside")  # the folder users run from
    return python, site, work


def fresh_run(fresh_env, code: str, *args, check=True):
    """Runs `code` with the fresh environment's Python, from a file in the
    outside folder (TorchScript reads the source of the classes it compiles)."""
    python, _, work = fresh_env
    script = work / f"script_{len(list(work.glob('script_*.py')))}.py"
    script.write_text(textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_SPARSITY", "PYTHON"))}
    result = subprocess.run(
        [str(python), script.name, *map(str, args)], capture_output=True, text=True, cwd=work, env=env, timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_wheel_holds_the_package_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.2f} MiB, {len(names)} files")
    print("\n".join(names))
    allowed = re.compile(
        r"^(torch_sparsity/(__init__|_build_info|_fake_classes|aoti|channel_groups|channel_layers|channel_ops|channels|checkpoints|cli|convert|export|masks|naming|"
        r"shrink_tensors|shrinking|sources|sparsifiers|"
        r"torchscript|utils)\.py"
        r"|torch_sparsity/lib/libtorch_sparsity\.so"
        r"|torch_sparsity/lib/cmake/TorchSparsity/TorchSparsity(Config|ConfigVersion|Targets|Targets-release)\.cmake"
        r"|torch_sparsity/include/torch_sparsity/(ops|classes|aoti)/[a-z_/]+\.h"
        r"|torch_sparsity/bin/sparsity_run"
        r"|torch_sparsity-[0-9.]+\.dist-info/(METADATA|WHEEL|RECORD|licenses/.*))$"
    )
    strays = [n for n in names if not allowed.match(n)]
    assert not strays, f"not part of the package: {strays}"
    for required in ("torch_sparsity/__init__.py", "torch_sparsity/_build_info.py",
                     "torch_sparsity/lib/libtorch_sparsity.so", "torch_sparsity/bin/sparsity_run",
                     "torch_sparsity/lib/cmake/TorchSparsity/TorchSparsityConfig.cmake",
                     "torch_sparsity/include/torch_sparsity/ops/fake_sparsity.h",
                     "torch_sparsity/include/torch_sparsity/classes/fake_sparsity_class.h"):
        assert required in names
    assert re.fullmatch(r"torch_sparsity-[0-9.]+-py3-none-linux_x86_64\.whl", wheel.name), wheel.name


def test_wheel_records_the_torch_it_was_built_against(wheel):
    build_info = zipfile.ZipFile(wheel).read("torch_sparsity/_build_info.py").decode()
    assert f'torch_version = "{torch.__version__}"' in build_info


def test_import_runs_the_operator_and_the_class(fresh_env):
    _, site, _ = fresh_env
    result = fresh_run(fresh_env, """
        import sys, torch, torch_sparsity
        assert torch_sparsity.__file__.startswith(sys.argv[1]), torch_sparsity.__file__
        assert torch_sparsity.library_path().startswith(sys.argv[1])
        assert torch_sparsity.load_library() == torch_sparsity.library_path()  # already loaded: a no-op
        x, mask = torch.randn(6, 5), torch.rand(6, 5) > 0.5
        assert torch.equal(torch.ops.sparsity.fake_sparsity(x, mask), mask * x)
        holder = torch.classes.sparsity.FakeSparsity(mask)
        assert torch.equal(holder.forward(x), mask * x)
        holder.update_mask(torch.zeros_like(mask))
        assert holder.sparsity_level() == 1.0 and not holder.forward(x).any()
        print("ok", torch_sparsity.__version__, torch_sparsity.cmake_prefix_path)
    """, site)
    assert result.stdout.startswith("ok ")
    assert str(ROOT) not in result.stdout


@pytest.fixture(scope="module")
def saved_resnet18(fresh_env):
    """resnet18 pruned, converted, scripted and saved by the fresh
    environment, with what tests/consumer/run_pruned_model.cpp compares with:
    input, output and the gradients of output.square().sum()."""
    _, _, work = fresh_env
    fresh_run(fresh_env, """
        import sys, warnings
        import torch, torchvision
        from torch_sparsity.convert import convert, fake_sparsities
        from torch_sparsity.sparsifiers import prune_with_weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval()
        prune_with_weight_norm(model, 0.5)
        example = torch.randn(2, 3, 64, 64)
        scripted = torch.jit.script(convert(model))
        assert torch.equal(scripted(example), model(example))
        assert len(fake_sparsities(scripted)) == 21
        scripted.save(sys.argv[1] + "/resnet18.pt")
        params = dict(scripted.named_parameters())
        output = scripted(example)
        grads = torch.autograd.grad(output.square().sum(), list(params.values()))
        tensors = {"input": example, "output": output}
        tensors.update({"grad__" + k.replace(".", "__"): g for k, g in zip(params, grads)})
        sys.path.insert(0, sys.argv[2])  # the tests' helpers (test code only: the package is the wheel's)
        from sparsity_testing import save_tensor_bag
        save_tensor_bag(sys.argv[1] + "/resnet18_expected.pt", tensors)
    """, work, HERE)
    return work / "resnet18.pt", work / "resnet18_expected.pt"


def test_convert_and_script_a_torchvision_model(saved_resnet18):
    model, expected = saved_resnet18
    assert model.is_file() and expected.is_file()


def test_convert_command_line(fresh_env):
    python, _, work = fresh_env
    out = run([python, "-m", "torch_sparsity.convert", "--model", "torchvision.models:resnet18", "--sparsity", "0.5",
               "-o", work / "cli.pt", "--input-shape", "1,3,32,32"], cwd=work)
    assert "converted 21 pruned tensors" in out and "max |scripted - eager|" in out


def test_sparsity_run_from_the_wheel(fresh_env, saved_resnet18):
    _, site, _ = fresh_env
    program = site / "torch_sparsity" / "bin" / "sparsity_run"
    # The plugin and torch come from the fresh environment, through the
    # program's relative RUNPATH, not from where the wheel was built.
    result = subprocess.run([program, saved_resnet18[0], "--shape", "1,3,32,32", "--runs", "1"],
                            capture_output=True, text=True, env=dict(os.environ, LD_DEBUG="libs"), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    loaded = {name: path for path, name in re.findall(r"calling init: (\S+/(libtorch_sparsity|libtorch)\.so)$",
                                                      result.stderr, re.M)}
    bin_dir = f"{site}/torch_sparsity/bin"
    assert loaded["libtorch_sparsity"] == f"{bin_dir}/../lib/libtorch_sparsity.so", loaded
    assert loaded["libtorch"] == f"{bin_dir}/../../torch/lib/libtorch.so", loaded
    assert "pruned tensors: 21\n" in result.stdout, result.stdout[-2000:]


@pytest.fixture(scope="module")
def wheel_consumer(fresh_env, tmp_path_factory):
    """tests/consumer built with no C++ standard of its own, configured with
    nothing but the fresh environment's torch_sparsity.cmake_prefix_path."""
    _, site, _ = fresh_env
    prefix = fresh_run(fresh_env, "import torch_sparsity; print(torch_sparsity.cmake_prefix_path)").stdout.strip()
    assert prefix == str(site / "torch_sparsity")
    return build_consumer(tmp_path_factory.mktemp("wheel-consumer"), prefix), prefix


def test_cpp_consumer_with_no_standard_found_through_cmake_prefix_path(fresh_env, saved_resnet18, wheel_consumer):
    _, site, _ = fresh_env
    build, prefix = wheel_consumer
    program = build / "run_pruned_model"
    cache = (build / "CMakeCache.txt").read_text()
    assert f"TorchSparsity_DIR:PATH={prefix}/lib/cmake/TorchSparsity" in cache
    assert f"Torch_DIR:PATH={site}/torch/share/cmake/Torch" in cache  # torch next to the package
    out = run([program, *saved_resnet18])
    assert "max |C++ - Python| output 0," in out and "weight gradients (62 tensors) 0" in out, out


def test_aoti_package_from_python_and_cpp(fresh_env, wheel_consumer):
    """A pruned model compiled to an AOTInductor package by the fresh
    environment, run there with a mask replaced, then by the C++ program
    built against the wheel (linking TorchSparsity::torch_sparsity is all it
    does to get the operators that the package calls)."""
    _, _, work = fresh_env
    fresh_run(fresh_env, """
        import sys, torch
        from torch import nn
        import torch_sparsity
        from torch_sparsity import aoti
        from torch_sparsity.convert import convert
        from torch_sparsity.sparsifiers import prune_with_weight_norm
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
        prune_with_weight_norm(model, 0.5)
        converted = convert(model, target="export")
        x = torch.randn(2, 3, 6, 6)
        runner = aoti.load(aoti.compile(converted, (x,), sys.argv[1] + "/small.pt2"))
        with torch.no_grad():
            expected = converted(x)
            assert (runner(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
            torch_sparsity.masks(converted)["3.weight"].zero_()
            zeroed = converted(x)
        runner.set_mask("3.weight", torch.zeros(5, 64, dtype=torch.bool))
        assert (runner(x) - zeroed).abs().max() <= 1e-5 * zeroed.abs().max()
        sys.path.insert(0, sys.argv[2])  # the tests' helpers
        from sparsity_testing import save_tensor_bag
        save_tensor_bag(sys.argv[1] + "/small_expected.pt", {"input": x, "output": expected, "output_zeroed": zeroed})
    """, work, HERE)
    program = wheel_consumer[0] / "run_pruned_package"
    out = run([program, work / "small.pt2", work / "small_expected.pt", "3.weight"])
    assert "masks: 2\n" in out and "float mask refused: yes" in out, out


def test_refuses_another_torch_before_loading(fresh_env):
    result = fresh_run(fresh_env, """
        import torch
        built = torch.__version__
        torch.__version__ = "2.0.0"  # as if another torch were installed
        try:
            import torch_sparsity
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("imported")
        try:
            torch.ops.sparsity.fake_sparsity
        except (AttributeError, RuntimeError):
            print("not loaded")
    """)
    assert f"was built against torch {torch.__version__}, but this process has torch 2.0.0" in result.stdout
    assert "not loaded" in result.stdout
