"""Models with half of their internal channels masked, for the shrink tests
and scripts/benchmarks/bench_shrink.py: torchvision resnet18/resnet50 (conv1
of every residual block), mobilenet_v3_small (the expanded channels of the
inverted residuals), vit_b_16 (the hidden units of every MLP) and a small
CNN, pruned with torch.nn.utils.prune: ln_structured along dim 0 picks the
channels of the layer that makes them, custom_from_mask masks every other
slice of those channels (BatchNorm's weight and bias, depthwise rows,
squeeze-excitation rows, biases), so that each masked channel is exactly
zero where it is consumed and shrink can remove it."""

import copy

import torch
import torchvision
from torch import nn
from torch.nn.utils import prune
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import MLPBlock

from end_to_end_models import _lively_random_weights

SHRINK_INPUT_SHAPES = {
    "resnet18": (1, 3, 64, 64),
    "resnet50": (1, 3, 64, 64),
    "mobilenet_v3_small": (1, 3, 64, 64),
    "vit_b_16": (1, 3, 224, 224),
}


def mask_rows(module: nn.Module, name: str, keep: torch.Tensor) -> None:
    """Masks the rows (dim 0) of `module.name` where `keep` is False."""
    tensor = getattr(module, name)
    mask = keep.reshape([-1] + [1] * (tensor.dim() - 1)).expand_as(tensor).to(tensor.dtype)
    prune.custom_from_mask(module, name, mask)


def mask_channels(producer: nn.Module, followers, amount: float = 0.5) -> torch.Tensor:
    """The `amount` of `producer`'s output channels with the smallest L2 norm
    masked (ln_structured, dim 0), and the same rows of its bias and of every
    (module, tensor name) in `followers`. Returns the kept channels (bool)."""
    prune.ln_structured(producer, "weight", amount=amount, n=2, dim=0)
    keep = producer.weight_mask.flatten(1).any(1)
    if producer.bias is not None:
        mask_rows(producer, "bias", keep)
    for module, name in followers:
        if getattr(module, name) is not None:
            mask_rows(module, name, keep)
    return keep


def _norm_terms(norm: nn.Module):
    return [(norm, "weight"), (norm, "bias")]


def mask_internal_channels(model: nn.Module, amount: float = 0.5) -> dict:
    """Masks `amount` of the internal channels of every block `model` has
    (see the module's docstring); returns {producer fqn: kept channels}."""
    kept = {}
    for fqn, block in list(model.named_modules()):
        if isinstance(block, (BasicBlock, Bottleneck)):
            kept[f"{fqn}.conv1"] = mask_channels(block.conv1, _norm_terms(block.bn1), amount)
        elif isinstance(block, MLPBlock):
            kept[f"{fqn}.0"] = mask_channels(block[0], [], amount)
        elif isinstance(block, InvertedResidual) and len(block.block) == 4:  # has an expansion conv
            expand, depthwise, excitation = block.block[0], block.block[1], block.block[2]
            followers = _norm_terms(expand[1]) + [(depthwise[0], "weight")] + _norm_terms(depthwise[1])
            if hasattr(excitation, "fc2"):
                followers += [(excitation.fc2, "weight"), (excitation.fc2, "bias")]
            kept[f"{fqn}.block.0.0"] = mask_channels(expand[0], followers, amount)
    if not kept:
        raise ValueError(f"mask_internal_channels: no block of {type(model).__name__} is known")
    refresh_pruned(model)
    return kept


def refresh_pruned(model: nn.Module) -> None:
    """Recomputes every nn.utils.prune tensor (orig * mask) without autograd:
    as pruning leaves it, it is no graph leaf and copy.deepcopy refuses it."""
    with torch.no_grad():
        for module in model.modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    hook(module, ())


def masked_torchvision_model(name: str, seed: int = 0, amount: float = 0.5):
    """torchvision model `name` (random lively weights, eval mode) with
    `amount` of its internal channels masked; returns (model, example input,
    {producer fqn: kept channels})."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    example = torch.randn(SHRINK_INPUT_SHAPES[name])
    _lively_random_weights(model, example)
    kept = mask_internal_channels(model, amount)
    return model, example, kept


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, a residual block and a Linear head, 16x16 inputs;
    `stream` channels between the blocks, `hidden` inside the residual one."""

    def __init__(self, stream: int = 8, hidden: int = 12):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stream, 3, padding=1), nn.BatchNorm2d(stream), nn.ReLU())
        self.conv1 = nn.Conv2d(stream, hidden, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, stream, 3, padding=1)
        self.head = nn.Linear(stream, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def masked_small_cnn(seed: int = 0):
    """SmallCNN (lively random weights, eval) with half of conv1's channels
    masked (weight rows, bias, bn1's weight and bias) and an unstructured
    mask on conv2's weight that stays after shrinking; returns (model, input,
    {producer fqn: kept channels})."""
    torch.manual_seed(seed)
    model = SmallCNN()
    example = torch.randn(2, 3, 16, 16)
    _lively_random_weights(model, example)
    kept = {"conv1": mask_channels(model.conv1, _norm_terms(model.bn1))}
    prune.l1_unstructured(model.conv2, "weight", amount=0.3)
    refresh_pruned(model)
    return model, example, kept


def effective_dense(model: nn.Module) -> nn.Module:
    """A copy of `model` without its nn.utils.prune masks, each pruned
    tensor replaced by its masked value: the same outputs, plain tensors."""
    dense = copy.deepcopy(model)
    for module in dense.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return dense
