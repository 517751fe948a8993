"""shrink's channel analysis, one flow rule per small model: a zero channel
goes, a constant one folds into a Linear (or an unpadded convolution) and
stays before a padded one, coupled channels go together, concatenation
offsets, flatten into a Linear, depthwise and GroupNorm coupling, and the
operations that keep channels (an unknown custom op, a view that mixes
channels). Each compares the shrunk model with the masked one."""

import pytest
import torch
from torch import nn

import torch_sparsity
from shrink_models import mask_rows, refresh_pruned
from sparsity_testing import assert_outputs_equal


def _zero_rows(module: nn.Module, rows, names=("weight", "bias")) -> None:
    """Masks `rows` of each tensor in `names` of `module` (nn.utils.prune)."""
    for name in names:
        tensor = getattr(module, name)
        if tensor is not None:
            keep = torch.ones(tensor.shape[0], dtype=torch.bool)
            keep[list(rows)] = False
            mask_rows(module, name, keep)


def _shrunk(model: nn.Module, x: torch.Tensor):
    """The report of shrinking `model` (eval mode), its output checked
    against the masked model's."""
    model.eval()
    refresh_pruned(model)
    with torch.no_grad():
        expected = model(x)
    report = torch_sparsity.shrink_report(model, (x,))
    with torch.no_grad():
        assert_outputs_equal(report.model(x), expected)
    return report


def _reasons(report) -> str:
    return " | ".join(reason for group in report.groups for reason in group.kept)


class Chain(nn.Module):
    """conv1 -> (BatchNorm) -> ReLU -> reader, the reader a padded or an
    unpadded convolution, or pooling and a Linear."""

    def __init__(self, reader="linear", bn=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.reader = reader
        if reader == "linear":
            self.head = nn.Linear(8, 5)
        else:
            self.head = nn.Conv2d(8, 5, 3, padding=1 if reader == "padded" else 0)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        if self.reader == "linear":
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


def _lively_bn(bn: nn.BatchNorm2d) -> None:
    """Running statistics and affine terms far from their initial values, so
    that a zero channel comes out of BatchNorm as a constant that is not zero."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(0.5, 1.5)


def test_a_zero_channel_goes():
    model = Chain("padded", bn=False)
    _zero_rows(model.conv1, [1, 4, 6])
    report = _shrunk(model, torch.randn(2, 3, 8, 8))
    small = report.model
    assert (small.conv1.out_channels, small.head.in_channels) == (5, 5)
    assert small.conv1.weight.shape == (5, 3, 3, 3) and small.head.weight.shape == (5, 5, 3, 3)
    assert report.after.parameters < report.before.parameters
    assert report.after.multiply_adds < report.before.multiply_adds


def test_a_constant_channel_behind_batchnorm_folds_into_a_linear():
    model = Chain("linear")
    _lively_bn(model.bn)
    _zero_rows(model.conv1, [0, 3], names=("weight",))  # the bias stays: conv gives the bias, BatchNorm a constant
    report = _shrunk(model, torch.randn(2, 3, 8, 8))
    assert report.model.head.in_features == 6 and report.model.bn.num_features == 6


def test_a_constant_channel_folds_into_an_unpadded_convolution():
    model = Chain("unpadded")
    _lively_bn(model.bn)
    _zero_rows(model.conv1, [2], names=("weight",))
    report = _shrunk(model, torch.randn(2, 3, 8, 8))
    assert report.model.head.in_channels == 7


def test_a_constant_channel_stays_before_a_padded_convolution():
    model = Chain("padded")
    _lively_bn(model.bn)
    _zero_rows(model.conv1, [2, 5], names=("weight",))
    report = _shrunk(model, torch.randn(2, 3, 8, 8))
    assert report.model.head.in_channels == 8
    assert "padded convolution" in _reasons(report)


class Residual(nn.Module):
    """Two producers added: their channels are coupled."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.out = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.out(torch.relu(self.a(x) + self.b(x)))


def test_coupled_channels_stay_unless_every_producer_prunes_them():
    model = Residual()
    _zero_rows(model.a, [0, 2])
    report = _shrunk(model, torch.randn(1, 3, 6, 6))
    assert report.model.a.out_channels == report.model.b.out_channels == report.model.out.in_channels == 6
    group = next(g for g in report.groups if "a" in g.producers)
    assert set(group.producers) == {"a", "b"} and group.removed == 0


def test_coupled_channels_go_when_every_producer_prunes_them():
    model = Residual()
    _zero_rows(model.a, [0, 2])
    _zero_rows(model.b, [0, 2])
    report = _shrunk(model, torch.randn(1, 3, 6, 6))
    assert report.model.a.out_channels == report.model.b.out_channels == report.model.out.in_channels == 4


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)
        self.out = nn.Conv2d(9, 2, 3, padding=1)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), torch.relu(self.b(x))], 1))


def test_concatenation_removes_at_the_offset():
    model = Concat()
    _zero_rows(model.a, [1])
    _zero_rows(model.b, [0, 3])
    weight = model.out.weight.detach().clone()
    report = _shrunk(model, torch.randn(1, 3, 6, 6))
    assert report.model.out.in_channels == 6
    kept = [0, 2, 3, 5, 6, 8]  # b's channels 0 and 3 sit at 4 and 7
    torch.testing.assert_close(report.model.out.weight, weight[:, kept], rtol=0, atol=0)


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_flatten_makes_a_channel_a_block_of_columns():
    model = FlattenHead()
    _zero_rows(model.conv, [2])
    weight = model.fc.weight.detach().clone()
    report = _shrunk(model, torch.randn(2, 3, 6, 6))
    assert report.model.fc.in_features == 27
    torch.testing.assert_close(report.model.fc.weight, torch.cat([weight[:, :18], weight[:, 27:]], 1), rtol=0, atol=0)


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.project(torch.relu(self.depthwise(torch.relu(self.expand(x)))))


@pytest.mark.parametrize("masked", ["expand", "depthwise"])
def test_depthwise_convolution_couples_its_input_and_output_channels(masked):
    model = Depthwise()
    _zero_rows(getattr(model, masked), [1, 2, 7])
    report = _shrunk(model, torch.randn(1, 3, 6, 6))
    small = report.model
    assert small.expand.out_channels == small.project.in_channels == 5
    assert small.depthwise.in_channels == small.depthwise.out_channels == small.depthwise.groups == 5


class GroupNormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.head = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))))


def test_groupnorm_channels_go_by_whole_groups():
    model = GroupNormModel()
    _zero_rows(model.conv, [2, 3, 5])  # group 1 whole, group 2 half
    _zero_rows(model.norm, [2, 3, 5])
    report = _shrunk(model, torch.randn(2, 3, 6, 6))
    small = report.model
    assert small.norm.num_channels == small.head.in_channels == 6 and small.norm.num_groups == 3


@torch.library.custom_op("shrink_rules::scale", mutates_args=())
def _scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_scale.register_fake
def _(x):
    return torch.empty_like(x)


class Blocked(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(4 if how == "view" else 8, 2, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        if self.how == "custom op":
            x = _scale(x)
        else:  # a view that splits the channels into pairs and sums them
            x = x.reshape(x.shape[0], 4, 2, *x.shape[2:]).sum(2)
        return self.head(x)


@pytest.mark.parametrize("how,reason", [("custom op", "shrink_rules.scale"), ("view", "splits or mixes")])
def test_an_unknown_or_mixing_operation_keeps_the_channels_and_says_which(how, reason):
    model = Blocked(how)
    _zero_rows(model.conv, [0, 1, 2, 3])
    report = _shrunk(model, torch.randn(1, 3, 6, 6))
    assert report.model.conv.out_channels == 8
    assert reason in _reasons(report)


def test_a_channel_that_reaches_the_output_stays():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    _zero_rows(model[0], [1])
    report = _shrunk(model, torch.randn(1, 3, 4, 4))
    assert report.model[0].out_channels == 4 and "output" in _reasons(report)


class SqueezeExcitation(nn.Module):
    """x * sigmoid(fc(pool(x))): the multiply couples the excitation's rows
    with x's channels; where x is zero the product is zero."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Conv2d(6, 3, 1)
        self.fc2 = nn.Conv2d(3, 6, 1)
        self.out = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * scale)


def test_a_multiply_by_a_zero_channel_lets_both_factors_go():
    model = SqueezeExcitation()
    _zero_rows(model.conv, [1, 4])
    report = _shrunk(model, torch.randn(2, 3, 6, 6))
    small = report.model
    assert small.conv.out_channels == small.fc1.in_channels == small.fc2.out_channels == small.out.in_channels == 4


def test_layernorm_over_the_channels_keeps_them():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    _zero_rows(model[0], [0, 1, 2])
    report = _shrunk(model, torch.randn(3, 4))
    assert report.model[0].out_features == 8 and "aten.layer_norm" in _reasons(report)


def test_a_mlp_hidden_unit_goes_from_both_linears():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 2))
    _zero_rows(model[0], [0, 5])
    report = _shrunk(model, torch.randn(2, 5, 4))
    assert report.model[0].out_features == report.model[3].in_features == 6


class Unpadded(nn.Module):
    """conv1 -> BatchNorm -> ReLU -> conv2 (1x1, no bias) -> ReLU -> conv3 (1x1, no bias)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 1, bias=False)
        self.conv3 = nn.Conv2d(5, 4, 1, bias=False)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x))))))


def test_a_fold_into_a_layer_without_bias_makes_one_that_follows_its_rows():
    model = Unpadded()
    _lively_bn(model.bn)
    model.bn.running_mean.zero_()  # the constants beta - gamma * mean / sqrt(var + eps) positive: ReLU keeps them
    _zero_rows(model.conv1, [0, 4], names=("weight",))
    _zero_rows(model.conv2, [1], names=("weight",))  # zero: its row of the new bias goes too
    report = _shrunk(model, torch.randn(2, 3, 5, 5))
    small = report.model
    assert (small.conv1.out_channels, small.conv2.out_channels) == (4, 4)
    assert small.conv2.bias.shape == (4,) and small.conv2.bias.dtype == torch.float32
    assert small.conv3.bias is None


class SharedReader(nn.Module):
    """One 1x1 convolution reads two tensors: a constant channel of one
    cannot fold into the bias both calls share."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.shared(self.a(x)) + self.shared(self.b(x))


def test_a_layer_called_twice_couples_what_it_reads_and_takes_no_fold():
    model = SharedReader()
    _zero_rows(model.a, [1], names=("weight",))  # a constant (a's bias) in one call only
    report = _shrunk(model, torch.randn(1, 3, 5, 5))
    assert report.model.a.out_channels == 4 and "called more than once" in _reasons(report)
    _zero_rows(model.a, [1])
    _zero_rows(model.b, [1])
    report = _shrunk(model, torch.randn(1, 3, 5, 5))
    assert report.model.a.out_channels == report.model.b.out_channels == report.model.shared.in_channels == 3


def test_max_pooling_with_indices_passes_the_channels_on():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    _zero_rows(model[0], [2, 3])
    report = _shrunk(model, torch.randn(2, 3, 5, 5))
    assert report.model[0].out_channels == report.model[3].in_features == 4


class PoolIndices(nn.Module):
    """Max pooling's indices, which the analysis does not follow, read by max_unpool."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        pooled, indices = nn.functional.max_pool2d(x, 2, return_indices=True)
        return self.head(nn.functional.max_unpool2d(pooled, indices, 2))


def test_an_output_the_analysis_does_not_follow_keeps_its_channels():
    model = PoolIndices()
    _zero_rows(model.conv, [1])
    report = _shrunk(model, torch.randn(1, 3, 4, 4))
    assert report.model.conv.out_channels == 4
    assert "output 1 of aten.max_pool2d_with_indices" in _reasons(report)


class Casts(nn.Module):
    """Casts (whose metadata checks the graph holds) and a mean and view into a Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x)).to(torch.float64).float()
        return self.fc(y.mean((2, 3)).view(-1, y.size(1)))


def test_casts_and_metadata_checks_pass_the_channels_on():
    model = Casts()
    _zero_rows(model.conv, [0, 2])
    report = _shrunk(model, torch.randn(2, 3, 4, 4))
    assert report.model.conv.out_channels == report.model.fc.in_features == 2


class Grouped(nn.Module):
    """expand -> a convolution of 2 groups -> project."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.project = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.project(torch.relu(self.grouped(torch.relu(self.expand(x)))))


def test_a_grouped_convolution_couples_the_same_place_of_each_group():
    model = Grouped()
    _zero_rows(model.expand, [1, 5])  # place 1 of both groups of 4 input channels
    _zero_rows(model.grouped, [0, 3])  # place 0 of both groups of 3 output channels
    report = _shrunk(model, torch.randn(1, 3, 5, 5))
    small = report.model
    assert (small.expand.out_channels, small.grouped.in_channels, small.grouped.groups) == (6, 6, 2)
    assert (small.grouped.out_channels, small.project.in_channels) == (4, 4)
    model = Grouped()
    _zero_rows(model.expand, [1, 6])  # places 1 and 2: each has a nonzero partner in the other group
    _zero_rows(model.grouped, [0])
    report = _shrunk(model, torch.randn(1, 3, 5, 5))
    assert (report.model.grouped.in_channels, report.model.grouped.out_channels) == (8, 6)


class Tied(nn.Module):
    """Two convolutions that share one weight, each reading its own input."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.b.weight = self.a.weight
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)) + torch.relu(self.b(x)))


def test_a_weight_tied_between_modules_keeps_its_channels():
    model = Tied()
    with torch.no_grad():
        model.a.weight[1] = 0
        model.a.bias[1] = model.b.bias[1] = 0
    report = _shrunk(model, torch.randn(1, 3, 4, 4))
    assert report.model.a.weight is report.model.b.weight and report.model.a.out_channels == 4
    assert "tied" in _reasons(report)
