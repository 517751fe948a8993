"""Pruned torchvision models and helpers shared by the end-to-end tests
(test_convert.py, test_sparsity_run.py)."""

import subprocess
from pathlib import Path

import torch
import torchvision

import torch_sparsity
from torch_sparsity.sparsifiers import prepare_with_masks, prune_with_weight_norm

# Input shapes: small images where the model allows; vit_b_16 needs 224.
INPUT_SHAPES = {
    "resnet18": (2, 3, 64, 64),
    "mobilenet_v3_small": (2, 3, 64, 64),
    "efficientnet_b0": (2, 3, 64, 64),
    "vit_b_16": (1, 3, 224, 224),
    "convnext_tiny": (1, 3, 64, 64),
    "maxvit_t": (1, 3, 224, 224),
    "swin_t": (1, 3, 64, 64),
    "swin_v2_t": (1, 3, 64, 64),
}


def hand_made_masks(model: torch.nn.Module, zeros: float = 0.2) -> dict:
    """A random mask for every floating parameter and buffer of every module
    (BatchNorm's running variance excepted: zeroing a variance blows the
    activations up), alternately bool and float32, as a user might write them."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    masks = {}
    for i, (fqn, tensor) in enumerate(tensors):
        if not tensor.is_floating_point() or fqn.endswith("running_var"):
            continue
        keep = torch.rand(tensor.shape) >= zeros
        masks[fqn] = keep if i % 2 == 0 else keep.float()
    return masks


def _lively_random_weights(model: torch.nn.Module, example: torch.Tensor) -> None:
    """Random weights that give outputs far from zero, so that comparing
    outputs means something: torchvision zero-initializes some tensors (ViT's
    head and class token), and BatchNorm's initial statistics (mean 0,
    variance 1) let activations die out through a deep network, so zero
    tensors get small random values and BatchNorm gets the statistics of a
    batch of random inputs."""
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.dim() >= 2 and not tensor.any():
                tensor.normal_(std=0.02)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: after one batch, that batch's statistics
        model.train()
        with torch.no_grad():
            model(torch.randn((8,) + tuple(example.shape[1:])))
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
    model.eval()


# torch.nn.utils.prune's methods, as pruned_model applies them.
NN_UTILS_PRUNE_METHODS = ("l1_unstructured", "ln_structured", "global_unstructured")


def _prune_with_nn_utils(model: torch.nn.Module, method: str) -> None:
    """Every Linear and Conv weight to 50% with torch.nn.utils.prune: by
    magnitude, by L2-norm of output channels, or by magnitude over all of them."""
    from torch.nn.utils import prune

    weights = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))]
    if method == "global_unstructured":
        prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=0.5)
    for module, name in weights:
        if method == "l1_unstructured":
            prune.l1_unstructured(module, name, amount=0.5)
        elif method == "ln_structured":
            prune.ln_structured(module, name, amount=0.5, n=2, dim=0)


# torch.ao.pruning's structured pruners, as pruned_model applies them:
# SaliencyPruner pruning the biases' rows too (its default), FPGMPruner not.
STRUCTURED_PRUNER_METHODS = ("saliency", "fpgm_keep_bias")


# torch.ao.pruning's BiasHook adds the bias along dim 1 of the output, which
# fails on a Linear's 3-d output ([batch, tokens, features]): in vit_b_16
# only the patch projection and the head can be pruned so.
STRUCTURED_PRUNABLE = {"vit_b_16": ("conv_proj", "heads.head")}


def prune_structured(model: torch.nn.Module, method: str, level: float = 0.5, only=None) -> None:
    """Rows (output channels) of every Linear and Conv2d weight (or of the
    modules named in `only`) to `level` with a torch.ao.pruning structured
    pruner (FakeStructuredSparsity and BiasHook), masks computed."""
    from torch.ao.pruning._experimental.pruner import FPGMPruner, SaliencyPruner

    pruner = SaliencyPruner({}) if method == "saliency" else FPGMPruner(level)
    prune_bias = method == "saliency"
    config = [
        {"tensor_fqn": f"{fqn}.weight", "sparsity_level": level, "prune_bias": prune_bias}
        for fqn, m in model.named_modules()
        if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and (only is None or fqn in only)
    ]
    pruner.prepare(model, config)
    pruner.step()


def pruned_model(name: str, method: str, seed: int = 0, input_shape=None, **model_args):
    """torchvision model `name` (random weights, eval mode) pruned by
    `method`: "weight_norm" (every Linear and Conv weight to 50%) or "hand_made"
    (hand_made_masks) with torch.ao.pruning, one of STRUCTURED_PRUNER_METHODS
    (prune_structured), or one of NN_UTILS_PRUNE_METHODS with
    torch.nn.utils.prune. `input_shape` and `model_args` (vit_b_16's
    image_size) change the defaults. Returns (model, example input)."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **model_args)
    example = torch.randn(input_shape or INPUT_SHAPES[name])
    _lively_random_weights(model, example)
    if method == "weight_norm":
        prune_with_weight_norm(model, 0.5)
    elif method == "hand_made":
        prepare_with_masks(model, hand_made_masks(model))
    elif method in NN_UTILS_PRUNE_METHODS:
        _prune_with_nn_utils(model, method)
    elif method in STRUCTURED_PRUNER_METHODS:
        prune_structured(model, method, only=STRUCTURED_PRUNABLE.get(name))
    else:
        raise ValueError(method)
    return model, example


def sparsity_run_path() -> Path:
    return Path(torch_sparsity.sparsity_run_path())


def sparsity_run(*args, timeout=300):
    """Runs the C++ program; returns the CompletedProcess (text output)."""
    program = sparsity_run_path()
    if not program.is_file():
        raise RuntimeError(f"{program} is missing: install the package (scripts/build.sh)")
    return subprocess.run(
        [str(program)] + [str(a) for a in args], capture_output=True, text=True, timeout=timeout
    )
