"""Pruning with torch.ao.pruning, for the converter's command line, the demo
and the tests: both leave the model with torch.ao.pruning's FakeSparsity
parametrizations, exactly as a sparsifier's ``prepare`` does."""

from types import SimpleNamespace
from typing import Dict

import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize

__all__ = ["NDWeightNormSparsifier", "prepare_with_masks", "prune_with_weight_norm"]


class NDWeightNormSparsifier(WeightNormSparsifier):
    """torch.ao.pruning's WeightNormSparsifier for tensors of any rank.

    WeightNormSparsifier computes masks for 2-D tensors (a Linear weight); a
    Conv2d weight makes it fail. This one hands it every other tensor viewed as
    2-D, (size of dim 0, the other dims flattened), the way a convolution's
    weight is laid out as a matrix (a vector as one row), and copies the mask it computes back into
    the real mask in place (keeping the mask's identity and dtype). Blocks of
    ``sparse_block_shape`` therefore run along the flattened dims.
    """

    def update_mask(self, module, tensor_name, **kwargs):
        tensor = getattr(module, tensor_name)
        if tensor.dim() == 2:
            return super().update_mask(module, tensor_name, **kwargs)
        mask = module.parametrizations[tensor_name][0].mask
        rows = tensor.shape[0] if tensor.dim() > 2 else 1  # a vector is one row
        flat_mask = mask.detach().reshape(rows, -1).clone()
        # What the parent's update_mask reads from a module: the tensor and
        # the mask of its FakeSparsity.
        flat_module = SimpleNamespace(
            parametrizations=SimpleNamespace(**{tensor_name: [SimpleNamespace(mask=flat_mask)]}),
            **{tensor_name: tensor.reshape(rows, -1)},
        )
        super().update_mask(flat_module, tensor_name, **kwargs)
        new_mask = flat_module.parametrizations.__dict__[tensor_name][0].mask
        mask.copy_(new_mask.reshape(mask.shape))


def prune_with_weight_norm(model: nn.Module, sparsity_level: float, **sparsifier_args) -> NDWeightNormSparsifier:
    """Prunes the weight of every Linear and ConvNd of ``model`` (in place) to
    ``sparsity_level`` with (ND)WeightNormSparsifier: prepare and one step.
    Returns the sparsifier, whose masks stay live in the model."""
    layer_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    config = [
        {"tensor_fqn": f"{name}.weight" if name else "weight"}
        for name, module in model.named_modules()
        if isinstance(module, layer_types)
    ]
    sparsifier = NDWeightNormSparsifier(sparsity_level=sparsity_level, **sparsifier_args)
    sparsifier.prepare(model, config)
    sparsifier.step()
    return sparsifier


def prepare_with_masks(model: nn.Module, masks: Dict[str, torch.Tensor]) -> nn.Module:
    """Parametrizes, in place, each tensor named in ``masks`` (tensor fqn ->
    mask) with torch.ao.pruning's FakeSparsity holding that very mask, as
    ``BaseSparsifier.prepare`` does with a config's ``mask``. Returns ``model``."""
    for tensor_fqn, mask in masks.items():
        module_fqn, _, tensor_name = tensor_fqn.rpartition(".")
        try:
            module = model.get_submodule(module_fqn)
        except AttributeError:
            raise ValueError(f"mask for '{tensor_fqn}': the model has no module '{module_fqn}'") from None
        tensor = getattr(module, tensor_name, None)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"mask for '{tensor_fqn}': module '{module_fqn}' has no tensor '{tensor_name}'")
        if mask.shape != tensor.shape:
            raise ValueError(
                f"mask for '{tensor_fqn}' has shape {tuple(mask.shape)}, the tensor {tuple(tensor.shape)}"
            )
        parametrize.register_parametrization(module, tensor_name, FakeSparsity(mask))
    return model
