"""torch_sparsity.shrink side by side with Torch-Pruning: the channels shrink
removed (its report's removed_channels), fed to Torch-Pruning's
DependencyGraph on a dense copy of the masked model (its pruned tensors
replaced by their masked values), give a model with the same layers, the
same tensors and the same outputs."""

import pytest
import torch
import torch_pruning as tp
from torch import nn

import torch_sparsity
from shrink_models import effective_dense, masked_small_cnn, masked_torchvision_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

CASES = ["small_cnn", "resnet18", "mobilenet_v3_small"]
SIZES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")


@pytest.fixture(scope="module", params=CASES)
def side_by_side(request):
    """(masked model, input, kept channels, shrink's report, Torch-Pruning's model)."""
    masked, example, kept = masked_small_cnn() if request.param == "small_cnn" else masked_torchvision_model(request.param)
    report = torch_sparsity.shrink_report(masked, (example,))
    theirs = effective_dense(masked)
    graph = tp.DependencyGraph().build_dependency(theirs, example_inputs=example)
    for fqn, removed in report.removed_channels.items():
        producer = theirs.get_submodule(fqn)
        rows = masked.get_submodule(fqn).weight.shape[0]
        if not removed or producer.weight.shape[0] == rows - len(removed):
            continue  # nothing, or already pruned with a producer it is coupled with
        prune_rows = tp.prune_conv_out_channels if isinstance(producer, nn.Conv2d) else tp.prune_linear_out_channels
        graph.get_pruning_group(producer, prune_rows, idxs=removed).prune()
    return masked, example, kept, report, theirs


def test_shrink_removes_the_masked_channels(side_by_side):
    masked, _, kept, report, _ = side_by_side
    dense = effective_dense(masked)
    for fqn, keep in kept.items():
        assert report.removed_channels[fqn] == (~keep).nonzero().flatten().tolist(), fqn
        assert torch.equal(report.model.get_submodule(fqn).weight, dense.get_submodule(fqn).weight[keep]), fqn


def test_same_layers_and_tensors_as_torch_pruning(side_by_side):
    _, _, _, report, theirs = side_by_side
    ours_modules = dict(report.model.named_modules())
    for fqn, module in theirs.named_modules():
        mine = ours_modules[fqn]
        assert type(mine) is type(module), fqn
        for size in SIZES:
            assert getattr(mine, size, None) == getattr(module, size, None), (fqn, size)
        tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        for name, tensor in tensors.items():
            # A mask that remains is applied: the tensor the layer computes with.
            assert torch.equal(getattr(mine, name), tensor), f"{fqn}.{name}"


def test_same_outputs_as_torch_pruning_and_the_masked_model(side_by_side):
    masked, example, _, report, theirs = side_by_side
    ours = report.model
    with torch.no_grad():
        expected = masked(example)
        scale = expected.abs().max().item()
        assert (ours(example) - expected).abs().max().item() <= 1e-5 * scale
        assert (ours(example) - theirs(example)).abs().max().item() <= 1e-5 * scale
