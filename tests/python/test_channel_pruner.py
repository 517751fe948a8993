"""ChannelPruner against the pruned eager model: every slice of a channel
group masked alike (weight rows, biases, BatchNorm weight and bias), shrink
exact and removing exactly the masked channels (resnet18, mobilenet_v3_small,
a small ViT; BatchNorm far from the identity), torch.ao.pruning's schedulers,
state_dict round trips, the options, squash_mask, convert, bad input."""

import copy
import io

import pytest
import torch
import torchvision
from torch import nn
from torch.ao.pruning import CubicSL, LambdaSL
from torch.ao.pruning._experimental.pruner.parametrization import FakeStructuredSparsity
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize

import torch_sparsity
from torch_sparsity.convert import convert
from torch_sparsity.sparsifiers import ChannelPruner
from end_to_end_models import _lively_random_weights
from shrink_models import SmallCNN
from sparsity_testing import assert_bitwise_equal, assert_module_unchanged, assert_outputs_equal, module_snapshot

pytestmark = [
    pytest.mark.filterwarnings("ignore:ChannelPruner leaves:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
]

MODELS = ["resnet18", "mobilenet_v3_small", "vit"]


def _randomize_norms(model: nn.Module) -> None:
    """BatchNorm statistics and affine terms far from the identity, so that
    a channel whose conv row alone is masked still leaves a constant."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(torch.randn_like(m.running_mean) * 0.1)
                m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.5, 2.0))
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(std=0.5)


def _model(name: str, device: str = "cpu"):
    """torchvision model `name` (or a small ViT, its zero head randomized)
    on 32x32 inputs: lively random weights, randomized norms, eval mode."""
    torch.manual_seed(0)
    if name == "vit":
        model = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    _lively_random_weights(model, x)
    _randomize_norms(model)
    return model.eval().to(device), x.to(device)


def _small(stream: int = 24, hidden: int = 40):
    """SmallCNN: a stream group (stem conv, conv2) and a hidden one (conv1)."""
    torch.manual_seed(0)
    model, x = SmallCNN(stream, hidden), torch.randn(2, 3, 16, 16)
    _lively_random_weights(model, x)
    _randomize_norms(model)
    return model.eval(), x


def _prepared(model, x, config=None, **options) -> ChannelPruner:
    pruner = ChannelPruner(x, **options)
    pruner.prepare(model, config)
    return pruner


@pytest.fixture(scope="module")
def pruned():
    """(model, x, pruner) per (name, device), pruned to 0.5 once for the
    module: tests that change the model change a copy."""
    cache = {}

    def get(name, device="cpu"):
        if (name, device) not in cache:
            model, x = _model(name, device)
            pruner = _prepared(model, x, sparsity_level=0.5)
            pruner.step()
            cache[name, device] = model, x, pruner
        return cache[name, device]

    return get


def _masks(model: nn.Module, kind=None) -> dict:
    """{tensor fqn: mask} of every parametrization (of type `kind`) in `model`."""
    return {
        f"{fqn}.{name}" if fqn else name: plist[0].mask
        for fqn, m in model.named_modules() if parametrize.is_parametrized(m)
        for name, plist in m.parametrizations.items() if kind is None or isinstance(plist[0], kind)
    }


def _assert_removed_the_masked_rows(rows: dict, report) -> None:
    """Each Conv/Linear with a row mask in `rows` ({weight fqn: mask}) lost
    exactly its masked rows: the report's indices (it lists the producers
    of groups, not a depthwise convolution, which passes its input's
    channels on) and the shrunk sizes."""
    for fqn, removed in report.removed_channels.items():
        mask = rows.get(f"{fqn}.weight")
        assert removed == ([] if mask is None else (~mask).nonzero().flatten().tolist()), fqn
    for fqn, mask in rows.items():
        assert report.model.get_submodule(fqn.removesuffix(".weight")).weight.shape[0] == mask.sum(), fqn


def _masked_rows(model: nn.Module) -> dict:
    """{Conv/Linear fqn: indices of its masked output channels}."""
    return {fqn.removesuffix(".weight"): (~mask).nonzero().flatten().tolist()
            for fqn, mask in _masks(model, FakeStructuredSparsity).items()}


def _slice_states(model: nn.Module, channel) -> list:
    """Per masked slice of `channel`: True where its mask keeps it, False
    where it masks it (a slice masked in part fails)."""
    states = []
    for fqn, dim, index in channel:
        module_fqn, _, name = fqn.rpartition(".")
        module = model.get_submodule(module_fqn)
        if not parametrize.is_parametrized(module, name):
            continue
        parametrization = module.parametrizations[name][0]
        if isinstance(parametrization, FakeStructuredSparsity):
            if dim != 0:  # the input columns of a consumer: its mask is of its own rows
                continue
            mask = parametrization.mask[index]
        else:
            mask = parametrization.mask.select(dim, index)
        assert mask.all() or not mask.any(), f"{fqn} is masked in part at {dim}, {index}"
        states.append(bool(mask.all()))
    return states


def _pruned_counts(model: nn.Module, pruner: ChannelPruner) -> list:
    """Per pruned group, how many channels its first producer's row mask zeroes."""
    rows = _masks(model, FakeStructuredSparsity)
    return [int((~rows[group.producers[0]]).sum()) for group in pruner.pruned_groups()]


@pytest.mark.parametrize("name", MODELS)
def test_every_slice_of_a_channel_is_masked_alike(name, pruned):
    model, _, pruner = pruned(name)
    assert pruner.pruned_groups()
    for group in pruner.channel_groups:
        masked = 0
        for channel in group.channels:
            states = _slice_states(model, channel)
            assert len(set(states)) <= 1, group.producers  # all slices kept, or all masked
            assert states or group.reason, group.producers  # a pruned channel has masks
            masked += bool(states) and not any(states)
        if group.reason is None:
            assert masked == group.pruned == int(0.5 * len(group.channels)), group.producers
        else:
            assert masked == 0, group.producers
    # What the model reads is zero wherever a mask is.
    for fqn, mask in _masks(model).items():
        module_fqn, _, name = fqn.rpartition(".")
        tensor = getattr(model.get_submodule(module_fqn), name)
        assert not tensor[~mask.bool()].any(), fqn


def test_resnet18_masks_are_equal_across_a_residual_stream(pruned):
    model, _, _ = pruned("resnet18")
    rows, entries = _masks(model, FakeStructuredSparsity), _masks(model, FakeSparsity)
    streams = [(["conv1", "layer1.0.conv2", "layer1.1.conv2"], ["bn1", "layer1.0.bn2", "layer1.1.bn2"])]
    streams += [([f"layer{i}.0.conv2", f"layer{i}.0.downsample.0", f"layer{i}.1.conv2"],
                 [f"layer{i}.0.bn2", f"layer{i}.0.downsample.1", f"layer{i}.1.bn2"]) for i in (2, 3, 4)]
    # A block's inner channels: its conv1 and bn1 alone.
    streams += [([f"layer{i}.{b}.conv1"], [f"layer{i}.{b}.bn1"]) for i in range(1, 5) for b in (0, 1)]
    for convs, norms in streams:
        keep = rows[f"{convs[0]}.weight"]
        assert (~keep).sum() == len(keep) // 2, convs[0]
        for conv in convs:
            assert torch.equal(rows[f"{conv}.weight"], keep), conv
        for norm in norms:
            for name in ("weight", "bias"):
                assert torch.equal(entries[f"{norm}.{name}"].bool(), keep), f"{norm}.{name}"
            norm = model.get_submodule(norm)
            assert not norm.weight[~keep].any() and not norm.bias[~keep].any()
            assert norm.weight[keep].all()  # randomized in [0.5, 1.5]: only the masks zero it


@pytest.mark.parametrize("name", MODELS)
def test_shrink_is_exact_and_removes_exactly_the_masked_channels(name, device, pruned):
    model, x, pruner = pruned(name, device)
    with torch.no_grad():
        expected = model(x)
    report = torch_sparsity.shrink_report(model, x)
    with torch.no_grad():
        assert_outputs_equal(report.model(x), expected)
    assert sum(group.removed for group in report.groups) == sum(g.pruned for g in pruner.pruned_groups()) > 0
    _assert_removed_the_masked_rows(_masks(model, FakeStructuredSparsity), report)
    assert report.after.multiply_adds < report.before.multiply_adds


def test_the_batchnorm_masks_matter(pruned):
    """With only the conv rows masked, a pruned channel leaves BatchNorm's
    constant (its bias, its statistics): the output changes, and shrink,
    exact still, cannot remove the channels whose constant reaches a
    padded convolution or a residual sum."""
    model, x, pruner = pruned("resnet18")
    rows_only = copy.deepcopy(model)
    with torch.no_grad():
        for mask in _masks(rows_only, FakeSparsity).values():
            mask.fill_(1)
        expected, rows_only_out = model(x), rows_only(x)
    assert not torch.allclose(rows_only_out, expected, atol=1e-3)
    report = torch_sparsity.shrink_report(rows_only, x)
    with torch.no_grad():
        assert_outputs_equal(report.model(x), rows_only_out)
    assert sum(group.removed for group in report.groups) < sum(g.pruned for g in pruner.pruned_groups())
    assert any(not mask.all() for mask in _masks(model, FakeSparsity).values())  # the fixture's model kept its masks


@pytest.mark.parametrize("scheduler", ["LambdaSL", "CubicSL"])
def test_schedulers_drive_the_masked_counts(scheduler):
    model, x = _small()
    pruner = _prepared(model, x, sparsity_level=0.5)
    sizes = [len(group.channels) for group in pruner.pruned_groups()]
    assert sizes == [24, 40]
    if scheduler == "LambdaSL":
        schedule, levels = LambdaSL(pruner, lambda epoch: [0.5, 0.75, 1.0][epoch]), [0.25, 0.375, 0.5]
    else:  # 0.5 + (0.25 - 0.5) * (1 - t / 2) ** 3
        schedule, levels = CubicSL(pruner, init_sl=0.25, init_t=0, delta_t=1, total_t=2), [0.25, 0.46875, 0.5]
    kept = [mask.clone() for mask in _masks(model, FakeStructuredSparsity).values()]
    for epoch, level in enumerate(levels):
        if epoch:
            schedule.step()
        assert [group["sparsity_level"] for group in pruner.groups] == [level] * len(pruner.groups)
        pruner.step()
        expected = [int(level * size) for size in sizes]
        assert _pruned_counts(model, pruner) == [g.pruned for g in pruner.pruned_groups()] == expected
        keep = [mask.clone() for mask in _masks(model, FakeStructuredSparsity).values()]
        assert not any((new & ~old).any() for new, old in zip(keep, kept))  # masked channels stay masked
        kept = keep


@pytest.mark.parametrize("through", ["state_dict", "torch.save"])
def test_state_dict_round_trip(through):
    model, x = _small()
    fresh = copy.deepcopy(model)
    first = _prepared(model, x, sparsity_level=0.5)
    # conv1's group at a level of its own, as a scheduler leaves it
    next(g for g in first.groups if g["tensor_fqn"] == "conv1.weight")["sparsity_level"] = 0.25
    first.step()
    state = first.state_dict()
    if through == "torch.save":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer)  # weights_only, torch.load's default
    second = _prepared(fresh, x, sparsity_level=0.9)
    second.load_state_dict(state)
    masks, loaded = _masks(model), _masks(fresh)
    assert loaded.keys() == masks.keys()
    for fqn, mask in masks.items():
        assert torch.equal(loaded[fqn], mask), fqn
    assert [g["sparsity_level"] for g in second.groups] == [g["sparsity_level"] for g in first.groups]
    assert second.report() == first.report()  # the counts of the loaded masks
    with torch.no_grad():
        assert_bitwise_equal(fresh(x), model(x))
    second.step()  # the loaded levels give the first pruner's masks again
    for fqn, mask in masks.items():
        assert torch.equal(loaded[fqn], mask), fqn


def test_load_state_dict_refuses_a_mismatch():
    model, x = _small()
    other, wider = copy.deepcopy(model), _small(24, 48)[0]
    first = _prepared(model, x)
    first.step()
    with pytest.raises(RuntimeError, match="needs a prepared pruner"):
        ChannelPruner(x).load_state_dict(first.state_dict())
    # Only conv1 in the config: its group alone has masks.
    second = _prepared(other, x, config=[{"tensor_fqn": "conv1.weight"}])
    before = {fqn: mask.clone() for fqn, mask in _masks(other).items()}
    with pytest.raises(ValueError, match="do not match"):
        second.load_state_dict(first.state_dict())
    for fqn, mask in _masks(other).items():
        assert torch.equal(mask, before[fqn]), fqn
    second.load_state_dict(first.state_dict(), strict=False)  # the masks both have
    for fqn, mask in _masks(other).items():
        assert torch.equal(mask, _masks(model)[fqn]), fqn
    third = _prepared(wider, x)
    with pytest.raises(ValueError, match="has shape"):
        third.load_state_dict(first.state_dict())
    assert all(mask.all() for mask in _masks(wider).values())


@pytest.mark.parametrize("norm,masked", [("l1", 1), ("l2", 0)])
def test_norm_ranks_the_channels(norm, masked):
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
    with torch.no_grad():  # L1 of the rows and columns: 3+2, 2+2, 15+2, 15+2; squared L2: 3+2, 4+2, 75+2, 75+2
        model[0].weight.copy_(torch.tensor([[1.0, 1, 1], [2, 0, 0], [5, 5, 5], [5, 5, 5]]).reshape(4, 3, 1, 1))
        model[2].weight.fill_(1.0)
    pruner = _prepared(model, torch.randn(1, 3, 4, 4), sparsity_level=0.25, norm=norm)
    pruner.step()
    assert _masked_rows(model)["0"] == [masked]


def test_global_pruning_ranks_every_channel_together():
    model, x = _small()
    pruner = _prepared(model, x, sparsity_level=0.25, global_pruning=True)
    pruner.step()
    sizes = [len(group.channels) for group in pruner.pruned_groups()]
    counts = _pruned_counts(model, pruner)
    assert sum(counts) == int(0.25 * sum(sizes)) == 16
    assert counts == [g.pruned for g in pruner.pruned_groups()] and all(c < s for c, s in zip(counts, sizes))
    # conv1's group with a large BatchNorm weight and bias (slices of that
    # group alone) ranks above every stream channel: only global ranking spares it.
    for global_pruning, expected in [(True, [16, 0]), (False, [6, 10])]:
        model, x = _small()
        with torch.no_grad():
            model.bn1.weight.mul_(1e4)
            model.bn1.bias.add_(1e4)
        pruner = _prepared(model, x, sparsity_level=0.25, global_pruning=global_pruning)
        pruner.step()
        assert _pruned_counts(model, pruner) == expected
    model, x = _small()
    pruner = _prepared(model, x, sparsity_level=1.0, global_pruning=True)
    pruner.step()
    assert _pruned_counts(model, pruner) == [23, 39]  # every group keeps a channel


@pytest.mark.parametrize("global_pruning", [False, True])
def test_round_to_keeps_multiples(global_pruning):
    model, x = _small()
    pruner = _prepared(model, x, sparsity_level=0.5, round_to=8, global_pruning=global_pruning)
    pruner.step()
    sizes = [len(group.channels) for group in pruner.pruned_groups()]
    kept = [size - count for size, count in zip(sizes, _pruned_counts(model, pruner))]
    assert all(k % 8 == 0 and k >= 8 for k in kept) and sum(kept) < sum(sizes)
    if not global_pruning:
        assert kept == [16, 24]  # 24 - 12 and 40 - 20, rounded up


@pytest.mark.parametrize("weight,expected", [("conv1.weight", [12, 0]), ("conv2.weight", [0, 20])])
def test_a_config_level_of_zero_leaves_its_group_alone(weight, expected):
    """A group's level is the lowest of its weights': conv2 writes the stream."""
    model, x = _small()
    config = [{"tensor_fqn": f"{fqn}.weight"} for fqn in ("stem.0", "conv1", "conv2", "head")]
    next(entry for entry in config if entry["tensor_fqn"] == weight)["sparsity_level"] = 0.0
    pruner = _prepared(model, x, config, sparsity_level=0.5)
    pruner.step()
    assert _pruned_counts(model, pruner) == [g.pruned for g in pruner.pruned_groups()] == expected


def test_a_weight_not_in_the_config_leaves_its_group_alone():
    model, x = _small()
    with pytest.warns(UserWarning, match="leaves 1 channel group.*conv2.weight is not in the config"):
        pruner = _prepared(model, x, [{"tensor_fqn": f"{fqn}.weight"} for fqn in ("stem.0", "conv1")])
    pruner.step()
    stream = next(group for group in pruner.channel_groups if "stem.0.weight" in group.producers)
    assert stream.reason == "conv2.weight is not in the config"
    assert "stem.0.weight (+1): 24 channels, left alone: conv2.weight is not in the config" in pruner.report()
    assert not parametrize.is_parametrized(model.conv2) and model.stem[0].parametrizations.weight[0].mask.all()
    assert _masked_rows(model)["conv1"] and [g.producers for g in pruner.pruned_groups()] == [["conv1.weight"]]


def test_layer_norm_and_the_vit_stream_are_left_alone(pruned):
    model, _, pruner = pruned("vit")
    stream = next(group for group in pruner.channel_groups if "conv_proj.weight" in group.producers)
    assert stream.reason and f"left alone: {stream.reason}" in pruner.report()
    assert sorted(p for g in pruner.pruned_groups() for p in g.producers) == [
        f"encoder.layers.encoder_layer_{i}.mlp.0.weight" for i in (0, 1)]
    assert not _masks(model, FakeSparsity).keys() & {"conv_proj.bias", "encoder.ln.weight"}
    # Normalized over its channels: a LayerNorm's input keeps them all.
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = _prepared(model, torch.randn(2, 8))
    assert "0.weight: 16 channels, left alone: aten.layer_norm" in pruner.report()
    assert [g.producers for g in pruner.pruned_groups()] == [["2.weight"]]


def test_squash_mask_leaves_plain_tensors_that_shrink_exactly():
    model, x = _small()
    pruner = _prepared(model, x)
    pruner.step()
    masks = {fqn: mask.clone() for fqn, mask in _masks(model).items()}
    rows = {fqn: mask.clone() for fqn, mask in _masks(model, FakeStructuredSparsity).items()}
    with torch.no_grad():
        expected = model(x)
    pruner.squash_mask()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(type(p) is nn.Parameter for p in model.parameters())
    for fqn, mask in masks.items():
        tensor = model.get_parameter(fqn)
        assert not tensor[~mask.bool()].any() and tensor[mask.bool()].any(), fqn
    with torch.no_grad():
        assert_bitwise_equal(model(x), expected)
    report = torch_sparsity.shrink_report(model, x)
    with torch.no_grad():
        assert_outputs_equal(report.model(x), expected)
    assert sum(group.removed for group in report.groups) == sum(g.pruned for g in pruner.pruned_groups()) == 32
    _assert_removed_the_masked_rows(rows, report)


@pytest.mark.parametrize("options,message", [
    ({"sparsity_level": 1.5}, "sparsity_level must be"), ({"sparsity_level": -0.1}, "sparsity_level must be"),
    ({"norm": "l3"}, "norm must be"), ({"round_to": 0}, "round_to must be"), ({"round_to": 2.5}, "round_to must be"),
    ({"round_to": True}, "round_to must be"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ChannelPruner(torch.randn(1, 3, 16, 16), **options)


def test_step_before_prepare_is_refused():
    with pytest.raises(RuntimeError, match="needs a prepared pruner"):
        ChannelPruner(torch.randn(1, 3, 16, 16)).step()


def test_a_deep_copied_pruner_steps_its_own_model():
    model, x = _small(8, 12)
    pruner = _prepared(model, x)
    twin = copy.deepcopy(pruner)
    assert twin.model is not model
    pruner.step()
    twin.step()
    assert twin.report() == pruner.report()
    for fqn, mask in pruner.state.items():
        assert torch.equal(twin.state[fqn]["mask"], mask["mask"]), fqn
    assert twin.model.conv1.parametrizations.weight[0].mask is twin.state["conv1.weight"]["mask"]
    expected = model(x)
    twin.squash_mask()  # the copies share parametrized classes: the original must keep its masks
    assert_bitwise_equal(model(x), expected)
    assert_bitwise_equal(twin.model(x), expected)


@pytest.mark.parametrize("case,config,message", [
    ("batchnorm weight", [{"tensor_fqn": "bn1.weight"}], "names Conv/Linear weights"),
    ("conv bias", [{"tensor_fqn": "conv1.bias"}], "names Conv/Linear weights"),
    ("missing module", [{"tensor_fqn": "missing.weight"}], "names Conv/Linear weights"),
    ("not a dict", ["conv1.weight"], "names Conv/Linear weights"),
    ("bad level", [{"tensor_fqn": "conv1.weight", "sparsity_level": 2.0}], "sparsity_level of conv1.weight"),
    ("twice", [{"tensor_fqn": "conv1.weight"}, {"tensor_fqn": "conv1.weight"}], "conv1.weight is twice in"),
    ("parametrized already", None, "conv1.weight is parametrized already"),
    ("wrong inputs", None, "does not run on example_inputs"),
])
def test_bad_input_is_refused_and_changes_nothing(case, config, message):
    model, x = _small(8, 12)
    if case == "parametrized already":
        parametrize.register_parametrization(model.conv1, "weight", FakeSparsity(torch.ones_like(model.conv1.weight)))
    parametrized = [fqn for fqn, m in model.named_modules() if parametrize.is_parametrized(m)]
    snapshot = module_snapshot(model)
    pruner = ChannelPruner(torch.randn(2, 5, 16, 16) if case == "wrong inputs" else x)
    with pytest.raises(ValueError, match=message):
        pruner.prepare(model, config)
    assert_module_unchanged(model, snapshot)
    assert [fqn for fqn, m in model.named_modules() if parametrize.is_parametrized(m)] == parametrized
    assert pruner.groups == [] and pruner.channel_groups == []


@pytest.mark.parametrize("target", ["torchscript", "export"])
def test_convert_computes_the_pruned_model_and_shrinks_exactly(target, pruned):
    model, x, _ = pruned("resnet18")
    converted = convert(model, target=target)
    with torch.no_grad():
        expected = model(x)
        assert_bitwise_equal(converted(x), expected)
        if target == "torchscript":
            assert_bitwise_equal(torch.jit.script(converted)(x), expected)
    if target == "export":
        report = torch_sparsity.shrink_report(converted, x)
        with torch.no_grad():
            assert_outputs_equal(report.model(x), expected)
        _assert_removed_the_masked_rows(_masks(model, FakeStructuredSparsity), report)
