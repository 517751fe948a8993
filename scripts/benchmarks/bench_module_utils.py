#!/usr/bin/env python
"""Times module_to_fqn and fqn_to_module: torch.ops.sparsity on a scripted
model against torch.ao.pruning's Python functions on the same eager model.

Calling an op from Python converts each module argument (a ScriptModule's
._c) to a TorchScript `Any`, which costs PyTorch's argument parser tens of
microseconds; the "op in TS" columns call the same ops from TorchScript, where
that conversion does not happen.

The models are a Sequential of groups, each a Sequential of nine Linear(1, 1),
so N submodules are N/10 groups and 9N/10 linears (two levels deep). Both
functions look for the last linear: module_to_fqn must walk every submodule
before finding it; fqn_to_module follows a two-name path, through a top-level
Sequential of N/10 children.

Usage: .venv/bin/python scripts/benchmarks/bench_module_utils.py
"""

import argparse
import time
import warnings

from typing import Any

import torch
from torch import nn
from torch.ao.pruning.sparsifier import utils as ao_utils

import torch_sparsity  # loads the plugin


def module_to_fqn_loop(model: Any, module: Any, calls: int) -> int:
    found = 0
    for _ in range(calls):
        if torch.ops.sparsity.module_to_fqn(model, module) is not None:
            found += 1
    return found


def fqn_to_module_loop(model: Any, path: str, calls: int) -> int:
    found = 0
    for _ in range(calls):
        if torch.ops.sparsity.fqn_to_module(model, path) is not None:
            found += 1
    return found


def make_model(submodules: int) -> nn.Module:
    groups = submodules // 10
    return nn.Sequential(*[nn.Sequential(*[nn.Linear(1, 1) for _ in range(9)]) for _ in range(groups)])


def seconds_per_call(fn, min_time: float = 0.2) -> float:
    """Best of five runs of a loop that lasts at least min_time."""
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            break
        calls *= 2
    best = elapsed / calls
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000])
    args = parser.parse_args()
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
    torch_sparsity.load_library()
    # The same ops called from TorchScript: no Python argument conversion.
    scripted_module_to_fqn = torch.jit.script(module_to_fqn_loop)
    scripted_fqn_to_module = torch.jit.script(fqn_to_module_loop)

    rows = []
    for size in args.sizes:
        eager = make_model(size)
        assert sum(1 for _ in eager.modules()) - 1 == size
        start = time.perf_counter()
        scripted = torch.jit.script(eager)
        script_seconds = time.perf_counter() - start
        last_group = str(size // 10 - 1)
        path = f"{last_group}.8"
        eager_leaf = eager.get_submodule(path)
        model_c = scripted._c
        leaf_c = model_c.getattr(last_group).getattr("8")

        assert torch.ops.sparsity.module_to_fqn(model_c, leaf_c) == ao_utils.module_to_fqn(eager, eager_leaf) == path
        assert torch.ops.sparsity.fqn_to_module(model_c, path) == leaf_c
        assert ao_utils.fqn_to_module(eager, path) is eager_leaf
        loop_calls = 1000
        rows.append((
            size,
            seconds_per_call(lambda: torch.ops.sparsity.module_to_fqn(model_c, leaf_c)),
            seconds_per_call(lambda: scripted_module_to_fqn(model_c, leaf_c, loop_calls)) / loop_calls,
            seconds_per_call(lambda: ao_utils.module_to_fqn(eager, eager_leaf)),
            seconds_per_call(lambda: torch.ops.sparsity.fqn_to_module(model_c, path)),
            seconds_per_call(lambda: scripted_fqn_to_module(model_c, path, loop_calls)) / loop_calls,
            seconds_per_call(lambda: ao_utils.fqn_to_module(eager, path)),
            script_seconds,
        ))

    print(f"torch {torch.__version__}; microseconds per call; (xK): growth over the previous size")
    print("op: torch.ops.sparsity from Python on the scripted model's ._c; op in TS: the same op called")
    print("in a loop inside a scripted function; py: torch.ao.pruning's function on the eager model.")
    header = ("submodules", "module_to_fqn op", "op in TS", "py",
              "fqn_to_module op", "op in TS", "py", "torch.jit.script s")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    previous = None
    for row in rows:
        cells = [f"{row[0]:,}"]
        for column in range(1, 7):
            micros = row[column] * 1e6
            growth = f" (x{row[column] / previous[column]:.1f})" if previous else ""
            cells.append(f"{micros:,.2f}{growth}")
        cells.append(f"{row[7]:.1f}")
        print("| " + " | ".join(cells) + " |")
        previous = row

if __name__ == "__main__":
    main()
