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
"""

import os
from pathlib import Path
from typing import Optional

import torch

__all__ = ["cmake_prefix_path", "library_path", "load_library", "masks", "sparsity_run_path", "__version__"]

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


def library_path() -> str:
    """The plugin library: $TORCH_SPARSITY_LIBRARY, else the package's own."""
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


_root = _package_root()
cmake_prefix_path = str(_root) if _root is not None else None
del _root
"""Put this in CMAKE_PREFIX_PATH to find_package(TorchSparsity); None when the
library comes from $TORCH_SPARSITY_LIBRARY alone."""


def sparsity_run_path() -> str:
    """The sparsity_run program installed with the package (or, with
    $TORCH_SPARSITY_LIBRARY, the one built next to that library)."""
    if os.environ.get("TORCH_SPARSITY_LIBRARY"):
        return str(Path(library_path()).parent / "sparsity_run")
    return str(Path(library_path()).parent.parent / "bin" / "sparsity_run")


_loaded_path = None


def load_library(path: Optional[str] = None) -> str:
    """Loads the plugin into this process once and returns its path.
    ``import torch_sparsity`` has already done it: this is then a no-op."""
    global _loaded_path
    if _loaded_path is None:
        path = path or library_path()
        torch.ops.load_library(path)
        _loaded_path = path
    elif path is not None and os.path.realpath(path) != os.path.realpath(_loaded_path):
        raise RuntimeError(f"torch_sparsity already loaded {_loaded_path}; a second library ({path}) cannot be loaded")
    return _loaded_path


if _build_info is not None and not os.environ.get("TORCH_SPARSITY_LIBRARY"):
    _check_torch_version()
load_library()

from . import _fake_classes  # noqa: E402,F401  (needs the library's classes)
from .masks import masks  # noqa: E402  (the live masks of a converted model or ExportedProgram)
