"""The names convert gives pruned tensors, and the package metadata key, are
defined once per language: torch_sparsity/naming.py and classes/naming.h.
These tests pin the two equal, in the source tree and as installed."""

import re
from pathlib import Path

import pytest

import torch_sparsity
from torch_sparsity import naming

ROOT = Path(__file__).resolve().parents[2]


def header_constants(path: Path) -> dict:
    """kOriginalSuffix = "_original" in the header, as naming.py spells it:
    {"ORIGINAL_SUFFIX": "_original"}."""
    found = re.findall(r'constexpr const char\* k(\w+) = "([^"]*)";', path.read_text())
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper(): value for name, value in found}


def installed_header():
    if torch_sparsity.cmake_prefix_path is None:
        pytest.skip("the library comes from TORCH_SPARSITY_LIBRARY, not from an installed package")
    return Path(torch_sparsity.cmake_prefix_path) / "include" / "torch_sparsity" / "classes" / "naming.h"


@pytest.mark.parametrize("where", ["source", "installed"])
def test_the_cpp_names_are_the_python_names(where):
    header = ROOT / "classes" / "naming.h" if where == "source" else installed_header()
    constants = header_constants(header)
    assert set(constants) == {"ORIGINAL_SUFFIX", "SPARSITY_SUFFIX", "MASK_SUFFIX", "MASKS_METADATA_KEY"}
    for name, value in constants.items():
        assert getattr(naming, name) == value, name
