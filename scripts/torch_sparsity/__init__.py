"""Python side of torch-sparsity: finds and loads the plugin library.

After ``load_library()`` the operators are ``torch.ops.sparsity.*`` and the
class is ``torch.classes.sparsity.FakeSparsity``.
"""

import os
from pathlib import Path

import torch

_REPO_ROOT = Path(__file__).resolve().parents[2]
_loaded_path = None


def library_path() -> str:
    """The plugin to load: $TORCH_SPARSITY_LIBRARY, else build/libtorch_sparsity.so."""
    path = os.environ.get("TORCH_SPARSITY_LIBRARY") or str(
        _REPO_ROOT / "build" / "libtorch_sparsity.so"
    )
    if not os.path.isfile(path):
        raise RuntimeError(
            f"torch-sparsity library not found at {path}; build it with scripts/build.sh "
            "or set TORCH_SPARSITY_LIBRARY"
        )
    return path


def load_library(path: str = None) -> str:
    """Loads the plugin once into this process and returns its path."""
    global _loaded_path
    if _loaded_path is None:
        _loaded_path = path or library_path()
        torch.ops.load_library(_loaded_path)
    return _loaded_path
