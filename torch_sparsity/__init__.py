"""torch-sparsity: mask-based ("fake") sparsity for PyTorch, as a C++ plugin.

``import torch_sparsity`` loads the plugin library, as ``import torchvision``
does: the operators are then ``torch.ops.sparsity.*`` and the class is
``torch.classes.sparsity.FakeSparsity``. The library, its headers, its CMake
package and the ``sparsity_run`` program live inside this package:

- ``library_path()``: the library loaded;
- ``cmake_prefix_path``: the folder to put in a C++ consumer's
  ``CMAKE_PREFIX_PATH`` for ``find_package(TorchSparsity)``;
- ``sparsity_run_path()``: the command-line program.

``$TORCH_SPARSITY_LIBRARY`` loads another build of the library instead (a
checkout's ``build/libtorch_sparsity.so``, say); nothing else is looked up
outside the package.

A process uses one build of the library. When it has loaded one before the
import (``torch.ops.load_library``), the import uses that one if it is the
same build as the package's and raises ``ImportError`` if not; loading
another build after the import raises ``ImportError`` too.
"""

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "ShrinkError", "cmake_prefix_path", "library_path", "load_library", "masks", "shrink", "shrink_report",
    "sparsity_run_path", "__version__",
]

_LIBRARY_NAME = "libtorch_sparsity.so"


def _package_root() -> Optional[Path]:
    """The folder of this package that holds lib/ (an editable install keeps
    the Python files and the built files in different folders)."""
    for entry in __path__:
        if (Path(entry) / "lib" / _LIBRARY_NAME).is_file():
            return Path(entry)
    return None


try:
    from . import _build_info
except ImportError:  # a source tree that was never built: only $TORCH_SPARSITY_LIBRARY can help
    _build_info = None

__version__ = _build_info.version if _build_info else "unknown"


def _check_torch_version() -> None:
    """The library's C++ ABI is that of the torch it was built against; in
    another it fails to load, or worse, so it is refused before that."""
    built = _build_info.torch_version
    running = torch.__version__
    same = running == built if "+" in built else running.split("+")[0] == built
    if not same:
        raise ImportError(
            f"torch_sparsity {__version__} was built against torch {built}, but this process has torch "
            f"{running}; its C++ library only works with the torch it was built against. Install "
            f"torch=={built}, or build torch_sparsity against this torch: "
            f"pip install --no-build-isolation <torch-sparsity source>"
        )


def _own_library_path() -> str:
    """$TORCH_SPARSITY_LIBRARY, else the package's own library."""
    override = os.environ.get("TORCH_SPARSITY_LIBRARY")
    if override:
        if not os.path.isfile(override):
            raise RuntimeError(f"TORCH_SPARSITY_LIBRARY={override} is not a file")
        return override
    root = _package_root()
    if root is None:
        raise RuntimeError(
            f"torch_sparsity has no {_LIBRARY_NAME} in {list(__path__)}: install the package "
            "(pip install --no-build-isolation .) or set TORCH_SPARSITY_LIBRARY to a built library"
        )
    return str(root / "lib" / _LIBRARY_NAME)


def library_path() -> str:
    """The plugin library in use: the one loaded (a file of the same build
    that was loaded before the import, say a checkout's build), else
    $TORCH_SPARSITY_LIBRARY, else the package's own."""
    return _loaded_path or _own_library_path()


_root = _package_root()
cmake_prefix_path = str(_root) if _root is not None else None
del _root
"""Put this in CMAKE_PREFIX_PATH to find_package(TorchSparsity); None when the
library comes from $TORCH_SPARSITY_LIBRARY alone."""


def sparsity_run_path() -> str:
    """The sparsity_run program installed with the package (or, with
    $TORCH_SPARSITY_LIBRARY, the one built next to that library)."""
    if os.environ.get("TORCH_SPARSITY_LIBRARY"):
        return str(Path(_own_library_path()).parent / "sparsity_run")
    return str(Path(_own_library_path()).parent.parent / "bin" / "sparsity_run")


# An ELF note of type NT_GNU_BUILD_ID (3) named "GNU": the linker's hash of
# what it linked. Notes lie near the file's start, before any code.
_BUILD_ID_NOTE = re.compile(rb"\x04\x00\x00\x00(.{4})\x03\x00\x00\x00GNU\x00", re.DOTALL)


def _build_identity(path: str) -> bytes:
    """What tells two builds of the library apart: the GNU build ID, which
    installing (strip, RPATH) leaves alone, else the file's SHA-256."""
    with open(path, "rb") as file:
        data = file.read()
    note = _BUILD_ID_NOTE.search(data, 0, 65536)
    if note is None:
        return hashlib.sha256(data).digest()
    start = note.end()
    return data[start:start + int.from_bytes(note.group(1), "little")]


def _is_library_file(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith("libtorch_sparsity") and name.endswith(".so")


def _mapped_libraries() -> list:
    """The files of this library the process has loaded, by whatever means
    (none where there is no /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.rstrip("\n").split(maxsplit=5) for line in maps]
    except OSError:
        return []
    return sorted({f[5] for f in fields if len(f) == 6 and f[5].startswith("/") and _is_library_file(f[5])})


def _check_same_build(path: str, loaded: str) -> None:
    """ImportError unless `path` is `loaded` or a file of the same build. A
    second file of one build registers nothing (the library sees to that);
    another build would run against the first one's registrations."""
    if os.path.realpath(path) != os.path.realpath(loaded) and _build_identity(path) != _build_identity(loaded):
        raise ImportError(
            f"{path} is another build of torch_sparsity's library than {loaded}, which this process has "
            "loaded already; a process can use one build only. Load one of them per process "
            "(TORCH_SPARSITY_LIBRARY=<file> makes import torch_sparsity load that file)"
        )


_loaded_path = None


def load_library(path: Optional[str] = None) -> str:
    """Loads the plugin into this process once and returns its path.
    ``import torch_sparsity`` has already done it: this is then a no-op. A
    file of the same build that the process has loaded already is used
    instead of loading another; another build raises ImportError."""
    global _loaded_path
    path = path or library_path()
    if _loaded_path is not None:
        _check_same_build(path, _loaded_path)
        return _loaded_path
    mapped = _mapped_libraries()
    for other in mapped:
        _check_same_build(path, other)
    if mapped:
        _loaded_path = mapped[0]
    else:
        torch.ops.load_library(path)
        _loaded_path = path
    return _loaded_path


def _refuse_other_builds(event: str, args: tuple) -> None:
    """Audit hook: ctypes (torch.ops.load_library) loading another build of
    the library after this one gets the ImportError, before that build's
    static registrations could run."""
    if event == "ctypes.dlopen" and isinstance(args[0], str) and _is_library_file(args[0]) and os.path.isfile(args[0]):
        _check_same_build(args[0], _loaded_path)


if _build_info is not None and not os.environ.get("TORCH_SPARSITY_LIBRARY"):
    _check_torch_version()
load_library()
sys.addaudithook(_refuse_other_builds)

from . import _fake_classes  # noqa: E402,F401  (needs the library's classes)
from .masks import masks  # noqa: E402  (the live masks of a converted model or ExportedProgram)
from .shrinking import ShrinkError, shrink, shrink_report  # noqa: E402  (smaller models where masks zero channels)
