"""Pruned models and helpers shared by the end-to-end tests (convert,
export, torch.compile, AOTInductor, sparsity_run): torchvision models and a
small model pruned in every supported way, and the comparisons of a
converted model with the pruned model it came from."""

import contextlib
import subprocess
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.ao.pruning._experimental.pruner import FPGMPruner, SaliencyPruner
from torch.nn.utils import parametrize, prune

import torch_sparsity
from sparsity_testing import max_abs_diff
from torch_sparsity.convert import convert, converted_name
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


def example_input():
    """An input for pruned_eager_model's models."""
    return torch.randn(1, 3, 64, 64)


def pruned_eager_model(arch):
    """A torchvision model prepared by WeightNormSparsifier: FakeSparsity
    parametrizations on its Linear weights and on a few conv weights."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)][:3]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = [{"tensor_fqn": f"{name}.weight"} for name in convs + linears]
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, config)
    # Real masks rather than all ones. (The sparsifier's step() pools 2-D
    # weights only, so conv masks are filled at random.)
    for group in sparsifier.groups:
        mask = group["module"].parametrizations[group["tensor_name"]][0].mask
        mask.copy_(torch.rand(mask.shape) > 0.5)
    return model


def small_pruned_model(pruning="weight_norm"):
    """Conv, BatchNorm, ReLU and Linear, pruned with torch.ao.pruning: 50% by
    weight norm, or ("structured") rows and their biases with the saliency
    pruner, whose masks the export target reads through
    fake_structured_sparsity. (A pruned channel whose bias is kept is
    constant, and BatchNorm's batch statistics then turn its rounding into
    noise of either sign that ReLU lets through or not: its gradients differ
    between any two summation orders.)"""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)
    )
    if pruning == "weight_norm":
        prune_with_weight_norm(model, 0.5)
    else:
        prune_structured(model, "saliency")
    return model


# net()'s pruned layers, and the sources prune_net prunes them by.
CONV, FC1, FC2 = 0, 3, 5
NET_SOURCES = ("ao_unstructured", "ao_structured_prune_bias", "ao_structured_keep_bias", "nn_utils_prune")


def net():
    # torch's own classes only, so that another process can unpickle it.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3, bias=False)
    )


def prune_net(model, source):
    """Prunes ``model`` (a net()) in place by ``source`` (NET_SOURCES):
    torch.ao.pruning by weight norm or by rows (SaliencyPruner pruning the
    biases' rows too, FPGMPruner not), or torch.nn.utils.prune in several
    forms (structured, iterative, a bias, a custom mask). Returns ``model``."""
    if source == "ao_unstructured":
        prune_with_weight_norm(model, 0.5)
    elif source.startswith("ao_structured"):
        prune_structured(model, "saliency" if source == "ao_structured_prune_bias" else "fpgm_keep_bias")
    else:
        prune.l1_unstructured(model[CONV], "weight", 0.5)
        prune.ln_structured(model[FC1], "weight", 0.5, n=2, dim=0)
        prune.l1_unstructured(model[FC1], "weight", 0.3)  # iterative: a PruningContainer
        prune.random_unstructured(model[FC1], "bias", 0.5)
        prune.custom_from_mask(model[FC2], "weight", torch.rand(3, 6, device=model[FC2].weight.device) > 0.5)
    return model


class TiedLanguageModel(nn.Module):
    """A tiny language model with tied embeddings: the output head's weight
    is the embedding's very Parameter (``head.weight = emb.weight``)."""

    def __init__(self, vocabulary=16, width=8):
        super().__init__()
        self.emb = nn.Embedding(vocabulary, width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)))


class SharedLinearModel(nn.Module):
    """A Linear reached by two paths (``self.a = self.b = linear``), called
    twice, then a Linear of its own."""

    def __init__(self, width=8):
        super().__init__()
        linear = nn.Linear(width, width)
        self.a = linear
        self.b = linear
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def tied_weights_input(model):
    """An input for TiedLanguageModel (tokens) or SharedLinearModel."""
    if isinstance(model, TiedLanguageModel):
        return torch.randint(0, model.emb.num_embeddings, (2, 5))
    return torch.randn(3, model.a.in_features)


# Pruning sources that prune_tensors applies.
PRUNING_SOURCES = ("ao_pruning", "nn_utils_prune")


def prune_tensors(model, fqns, source):
    """Prunes the tensors ``fqns`` of ``model`` in place with random masks
    (each module a mask of its own): torch.ao.pruning's FakeSparsity
    parametrizations ("ao_pruning") or torch.nn.utils.prune
    ("nn_utils_prune"). Returns ``model``."""
    if source == "ao_pruning":
        return prepare_with_masks(model, {fqn: torch.rand(model.get_parameter(fqn).shape) > 0.5 for fqn in fqns})
    for fqn in fqns:
        module_fqn, _, name = fqn.rpartition(".")
        prune.random_unstructured(model.get_submodule(module_fqn), name, amount=0.5)
    return model


# ------------------------------------------- comparing with the pruned model


def eager_pruned_tensors(model):
    """tensor fqn -> (module, tensor name) for every FakeSparsity parametrization."""
    found = {}
    for module_fqn, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                found[f"{module_fqn}.{name}" if module_fqn else name] = (module, name)
    return found


@contextlib.contextmanager
def eager_mask_set_to(model, fqn, values):
    """The pruned model with the torch.ao.pruning mask of `fqn` (a
    FakeSparsity or FakeStructuredSparsity parametrization) holding `values`
    for the duration. (torch's structured bias hook zeroes the biases of
    pruned rows in place: those stay zero afterwards.)"""
    module_fqn, _, name = fqn.rpartition(".")
    mask = getattr(model.get_submodule(module_fqn).parametrizations, name)[0].mask
    saved = mask.clone()
    mask.copy_(values)
    try:
        yield
    finally:
        mask.copy_(saved)


def forward_backward(model, inputs, seed=1):
    """Output and {converted parameter name: grad} of output.square().mean()."""
    torch.manual_seed(seed)  # dropout and stochastic depth draw the same numbers
    output = model(*inputs)
    if isinstance(output, tuple):
        output = output[0]
    params = [(converted_name(n), p) for n, p in model.named_parameters()]
    grads = torch.autograd.grad(output.square().mean(), [p for _, p in params], allow_unused=True)
    return output, {name: grad for (name, _), grad in zip(params, grads)}


@contextlib.contextmanager
def mha_slow_path():
    """Eager MultiheadAttention as torch.export traces it. In eager inference
    it takes a fused fast path (torch._native_multi_head_attention) that
    export never records; the two differ in the last bits (vit_b_16: 3e-7)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def pruned_entries(mask, tensor):
    """Where `tensor` is pruned by `mask` (of its shape, or one entry per row)."""
    if mask.shape != tensor.shape:
        mask = mask.reshape([-1] + [1] * (tensor.dim() - 1)).expand_as(tensor)
    return ~mask.bool()


def assert_compiled_training_matches_eager(eager, make_input, tolerance, steps=3):
    """`steps` SGD steps with momentum of the torch.ao.pruning model `eager`
    and of its export-target twin under torch.compile (inductor, forward and
    backward), on the same inputs: every gradient after each step, and the
    state at the end, within `tolerance` of eager's, relative to the largest
    value of each. A parameter eager gives no gradient (torch's structured
    bias hook adds its _bias through .data) gets none either. Pruned entries
    got no gradient and stay what they were: the weight the model computes
    with is zero there in both. Returns the converted model."""
    converted = convert(eager, target="export").train()
    compiled = torch.compile(converted)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, converted)]
    for step in range(steps):
        x = make_input()
        for model, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        grads = {converted_name(n): p.grad for n, p in eager.named_parameters()}
        for name, param in converted.named_parameters():
            assert (param.grad is None) == (grads[name] is None), f"step {step}: {name}"
            if param.grad is None:
                continue
            assert param.grad.device == grads[name].device, f"step {step}: {name}"
            scale = grads[name].abs().max().item()
            assert max_abs_diff(param.grad, grads[name]) <= tolerance * scale + 1e-7, f"step {step}: {name}"
    eager_state = {converted_name(k): v for k, v in eager.state_dict().items()}
    for name, value in converted.state_dict().items():
        diff = max_abs_diff(value.double(), eager_state[name].double())
        assert diff <= tolerance * value.abs().max().item() + 1e-7, name
    for fqn, mask in torch_sparsity.masks(converted).items():
        module_fqn, _, name = fqn.rpartition(".")
        module = converted.get_submodule(module_fqn)
        original = getattr(module, name + "_original")
        pruned = pruned_entries(mask, original)
        assert not getattr(module, name)[pruned].any(), fqn
        assert not original.grad[pruned].any(), fqn
    return converted


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
