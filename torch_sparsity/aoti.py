"""AOTInductor packages of pruned models whose masks stay live.

``compile(model, example_inputs, package_path)`` exports a model converted
with ``convert(model, target="export")`` (or takes its ExportedProgram) and
compiles it into a ``.pt2`` package; the masks become constants of the
compiled model, recorded by tensor fqn in the package's metadata
(``"fqn=mask constant,original constant;..."``: the constants a tensor's mask
and the tensor it applies to are compiled as). By default
(``fold_masks=True``) the package folds each ``mask * T_original`` into a
weight of its own when it is loaded and again after each ``set_mask``
(AOTInductor's runtime constant folding), so a forward runs as the squashed
dense model's does while the masks stay live.
``load(package_path)`` returns a ``PrunedRunner``: call it to run the model;
``mask_names()``, ``mask(fqn)`` and ``set_mask(fqn, mask)`` read and replace
the masks, checked (fqn, shape, dtype, device) before the package is touched.
The runner is the C++ ``sparsity::aoti::PrunedPackage``
(``torch.classes.sparsity.PrunedPackage``), which C++ programs use directly.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree

from . import load_library
from .masks import exported_mask_reads, masks
from .naming import MASKS_METADATA_KEY

__all__ = ["MASKS_METADATA_KEY", "PrunedRunner", "compile", "load"]


def _mask_constants(program: "torch.export.ExportedProgram") -> Dict[str, Tuple[str, str]]:
    """tensor fqn -> the fqns of its mask buffer and of the tensor the mask
    applies to, as the graph reads them: AOTInductor names its constants so
    (a tensor tied between modules, or a module reached by several paths, is
    read under one of its names only)."""
    reads = exported_mask_reads(program)
    for fqn in masks(program):
        if fqn not in reads:
            raise ValueError(
                f"torch_sparsity.aoti.compile: the mask of {fqn} is not a buffer that the program reads through "
                "torch.ops.sparsity.fake_sparsity; compile models converted with convert(model, target='export')"
            )
    return reads


# The operators as their contract defines them, in operators that
# AOTInductor's constant folding can run.
def _mask_times(x, mask):
    return mask * x


def _row_mask_times(x, mask):
    return mask.reshape([-1] + [1] * (x.dim() - 1)) * x


def compile(
    model,
    example_inputs: Sequence[Any],
    package_path: str,
    *,
    dynamic_shapes=None,
    strict: bool = False,
    fold_masks: bool = True,
    inductor_configs: Optional[Dict[str, Any]] = None,
) -> str:
    """Compiles a pruned model into an AOTInductor package at
    ``package_path`` and returns the path. ``model`` is a model converted with
    ``convert(model, target="export")``, exported here (``strict``,
    ``dynamic_shapes`` as for torch.export.export), or an ExportedProgram of
    one. Every mask stays a constant of its own, so that ``set_mask`` can
    replace it: ``always_keep_tensor_constants`` is set, since AOTInductor
    may otherwise inline tensors of 8 or fewer entries.

    ``fold_masks=True`` (the default) writes each ``fake_sparsity(T, mask)``
    of the program as ``mask * T`` (the operator's very definition, same bits;
    ``fake_structured_sparsity`` as ``mask.reshape(-1, 1, ...) * T``)
    and turns on ``aot_inductor.use_runtime_constant_folding``: the package
    computes the masked weights once when loaded, keeps them (one more copy
    of each pruned tensor in memory), and computes them again on the first
    run after a ``set_mask``. AOTInductor's folding cannot call custom
    operators, hence the rewrite. ``fold_masks=False`` keeps the operator in
    the compiled code, where it runs on every forward (through the proxy
    executor, so the plugin must be loaded in the running process)."""
    load_library()
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=strict)
    constants = _mask_constants(program)
    if not constants:
        raise ValueError(
            "torch_sparsity.aoti.compile: the model has no masks read through torch.ops.sparsity.fake_sparsity; "
            "convert it with torch_sparsity.convert.convert(model, target='export') first"
        )
    configs = dict(inductor_configs or {})
    if fold_masks:
        program = program.run_decompositions({
            torch.ops.sparsity.fake_sparsity.default: _mask_times,
            torch.ops.sparsity.fake_structured_sparsity.default: _row_mask_times,
        })
        configs.setdefault("aot_inductor.use_runtime_constant_folding", True)
    metadata = dict(configs.pop("aot_inductor.metadata", {}) or {})
    metadata[MASKS_METADATA_KEY] = ";".join(
        f"{fqn}={mask},{original}" for fqn, (mask, original) in sorted(constants.items())
    )
    configs["aot_inductor.metadata"] = metadata
    configs.setdefault("always_keep_tensor_constants", True)
    return torch._inductor.aoti_compile_and_package(program, package_path=str(package_path), inductor_configs=configs)


class PrunedRunner:
    """A loaded package: ``runner(*inputs)`` runs the model (inputs and
    outputs in the structure the model was exported with); the masks are
    read and replaced through ``mask_names``, ``mask`` and ``set_mask``."""

    def __init__(self, package_path: str, model_name: str = "model"):
        load_library()
        self._package = torch.classes.sparsity.PrunedPackage(str(package_path), model_name)
        in_spec, out_spec = self._package.call_spec()
        self._in_spec = pytree.treespec_loads(in_spec)
        self._out_spec = pytree.treespec_loads(out_spec)

    def __call__(self, *args, **kwargs):
        from torch.export._tree_utils import reorder_kwargs

        flat = pytree.tree_flatten((args, reorder_kwargs(kwargs, self._in_spec)))[0]
        outputs = self._package.run([x for x in flat if isinstance(x, torch.Tensor)])
        return pytree.tree_unflatten(outputs, self._out_spec)

    def mask_names(self):
        """The pruned tensors' fqns, sorted."""
        return list(self._package.mask_names())

    def mask(self, fqn: str) -> torch.Tensor:
        """A copy of the mask of ``fqn`` as the next run uses it."""
        return self._package.mask(fqn)

    def set_mask(self, fqn: str, mask: torch.Tensor) -> None:
        """Replaces the mask of ``fqn`` for the next runs; a mask of another
        shape, dtype or device, or an unknown fqn, is a RuntimeError and
        changes nothing."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"set_mask expects a Tensor for {fqn}, got {type(mask).__name__}")
        self._package.set_mask(fqn, mask)

    @property
    def package(self):
        """The underlying torch.classes.sparsity.PrunedPackage."""
        return self._package


def load(package_path: str, model_name: str = "model") -> PrunedRunner:
    """Loads a package written by ``compile``."""
    return PrunedRunner(package_path, model_name)

