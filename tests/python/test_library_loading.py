"""Loading the plugin twice in one process: torch.ops.load_library of a build
of the library and `import torch_sparsity`, in either order. The same build is
reused (its operators and classes work, convert works), another build is
refused with an ImportError that names both files, and the process never
aborts. Each case runs in a fresh Python, since a process loads a library once."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import torch_sparsity

ROOT = Path(__file__).resolve().parents[2]

# What a working library gives: the operator, the class, and convert on a
# model pruned with torch.nn.utils.prune, scripted.
WORKS = """
x, mask = torch.randn(4, 4), torch.rand(4, 4) > 0.5
assert torch.equal(torch.ops.sparsity.fake_sparsity(x, mask), x * mask)
assert torch.equal(torch.classes.sparsity.FakeSparsity(mask).mask, mask)
from torch_sparsity.convert import convert
model = torch.nn.Sequential(torch.nn.Linear(4, 3))
torch.nn.utils.prune.random_unstructured(model[0], "weight", amount=0.5)
scripted = torch.jit.script(convert(model))
with torch.no_grad():
    assert torch.equal(scripted(x), model(x))
"""


def run_python(*snippets: str) -> subprocess.CompletedProcess:
    """The snippets, one after the other, in a fresh Python whose package
    loads its own library (not one named by $TORCH_SPARSITY_LIBRARY)."""
    code = "\n".join(["import sys, torch"] + [textwrap.dedent(snippet) for snippet in snippets])
    env = {k: v for k, v in os.environ.items() if k != "TORCH_SPARSITY_LIBRARY"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def assert_not_aborted(result):
    assert result.returncode not in (-6, 134), "the process aborted:\n" + result.stderr[-3000:]


@pytest.fixture(params=["copy", "build"])
def same_build(request, tmp_path):
    """Another file of the package's build of the library: a copy of it, or
    the checkout's build/libtorch_sparsity.so that scripts/build.sh installed
    it from (other bytes: the install strips it and changes its RPATH)."""
    own = torch_sparsity.library_path()
    if request.param == "copy":
        path = tmp_path / "libtorch_sparsity.so"
        shutil.copyfile(own, path)
        return str(path)
    path = ROOT / "build" / "libtorch_sparsity.so"
    if not path.is_file() or path.resolve() == Path(own).resolve():
        pytest.skip("no build/libtorch_sparsity.so next to an installed package")
    if torch_sparsity._build_identity(str(path)) != torch_sparsity._build_identity(own):
        pytest.skip("build/ was rebuilt since the package was installed")
    return str(path)


@pytest.fixture
def other_build(tmp_path):
    """A loadable library of another build: the package's, with its build ID
    changed."""
    own = Path(torch_sparsity.library_path())
    identity = torch_sparsity._build_identity(str(own))
    data = own.read_bytes()
    assert data.count(identity) == 1
    path = tmp_path / "other" / "libtorch_sparsity.so"
    path.parent.mkdir()
    path.write_bytes(data.replace(identity, bytes(b ^ 0xFF for b in identity)))
    assert torch_sparsity._build_identity(str(path)) != identity
    return str(path)


def test_load_library_then_import_reuses_the_same_build(same_build):
    result = run_python(f"""
        torch.ops.load_library({same_build!r})
        import torch_sparsity
        assert torch_sparsity.library_path() == {same_build!r}, torch_sparsity.library_path()
        assert torch_sparsity.load_library() == {same_build!r}
    """, WORKS, 'print("ok")')
    assert_not_aborted(result)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_import_then_load_library_of_the_same_build(same_build):
    result = run_python(f"""
        import torch_sparsity
        own = torch_sparsity.library_path()
        torch.ops.load_library({same_build!r})
        assert torch_sparsity.library_path() == own
    """, WORKS, 'print("ok")')
    assert_not_aborted(result)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_same_file_loaded_twice(same_build):
    result = run_python(f"""
        torch.ops.load_library({same_build!r})
        torch.ops.load_library({same_build!r})
        import torch_sparsity
        assert torch_sparsity.load_library({same_build!r}) == {same_build!r}
    """, WORKS, 'print("ok")')
    assert_not_aborted(result)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_load_library_of_another_build_then_import_is_refused(other_build):
    result = run_python(f"""
        torch.ops.load_library({other_build!r})
        try:
            import torch_sparsity
        except ImportError as error:
            print(error)
            sys.exit(3)
    """)
    assert_not_aborted(result)
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    assert other_build in result.stdout and torch_sparsity.library_path() in result.stdout, result.stdout


def test_import_then_load_library_of_another_build_is_refused(other_build):
    result = run_python(f"""
        import torch_sparsity
        try:
            torch.ops.load_library({other_build!r})
        except OSError as error:  # torch.ops.load_library wraps what ctypes raised
            assert isinstance(error.__cause__, ImportError), repr(error.__cause__)
            print(error.__cause__)
        assert {other_build!r} not in torch.ops.loaded_libraries
    """, WORKS, "sys.exit(3)")
    assert_not_aborted(result)
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    assert other_build in result.stdout and torch_sparsity.library_path() in result.stdout, result.stdout


def test_a_second_copy_registers_nothing(other_build):
    """The library's own guard, without the package: a second file loaded
    (here of another build) registers none of its operators, kernels or
    classes, and the first one's keep working."""
    result = run_python(f"""
        torch.ops.load_library({torch_sparsity.library_path()!r})
        torch.ops.load_library({other_build!r})
        x, mask = torch.randn(4, 4), torch.rand(4, 4) > 0.5
        assert torch.equal(torch.ops.sparsity.fake_sparsity(x, mask), x * mask)
        assert torch.equal(torch.classes.sparsity.FakeSparsity(mask).mask, mask)
        print("ok")
    """)
    assert_not_aborted(result)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    assert "Overriding a previously registered kernel" not in result.stderr, result.stderr[-3000:]
