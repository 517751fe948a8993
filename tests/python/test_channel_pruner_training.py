"""ChannelPruner's masks stay live while the pruned model trains: eagerly
(with a scheduler raising the level between epochs too), converted to either
target (the TorchScript one scripted as well), under torch.compile, and under
DistributedDataParallel (gloo, two processes). After every SGD step (momentum,
weight decay) each masked slice (weight rows, biases, BatchNorm weights and
biases) computes as exactly zero; the masked channels' activations are
exactly zero in training and in eval; the trained model shrinks exactly.
Every other form is held to the pruned eager model trained on the same
batches in this process."""

import copy
import functools
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.ao.pruning import LambdaSL
from torch.nn.utils import parametrize

import torch_sparsity
from end_to_end_models import assert_compiled_training_matches_eager, pruned_entries
from sparsity_testing import max_abs_diff
from torch_sparsity.convert import convert, converted_name, fake_sparsities
from torch_sparsity.shrinking import shrink_report
from torch_sparsity.sparsifiers import ChannelPruner

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
]

STEPS, BATCH, CLASSES, SIZE = 3, 8, 5, 8


class TinyResNet(nn.Module):
    """A stem, a residual block on it, a block that halves the resolution
    with a 1x1 downsample branch, and a two-Linear head; BatchNorm after
    every convolution, a bias on conv1 and on the Linears."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv4, self.bn4 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.fc1, self.fc2 = nn.Linear(16, 12), nn.Linear(12, CLASSES)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        x = torch.relu(self.down(x) + self.bn4(self.conv4(torch.relu(self.bn3(self.conv3(x))))))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(torch.relu(self.fc1(x)))


def pruned_tiny(level=0.5, device="cpu", step=True):
    """A TinyResNet with random BatchNorm statistics and affine parameters
    (so that a masked channel's statistics are not zero), ChannelPruner
    prepared on every Conv/Linear weight but fc2's (its channels are the
    model's output) and, with ``step``, stepped once. Returns (model, pruner)."""
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.5, 0.5),
                                          (module.running_mean, -0.5, 0.5), (module.running_var, 0.5, 1.5)):
                    tensor.uniform_(low, high)
    model.to(device)
    pruner = ChannelPruner(torch.randn(2, 3, SIZE, SIZE, device=device), level)
    config = [{"tensor_fqn": f"{fqn}.weight"} for fqn, module in model.named_modules()
              if isinstance(module, (nn.Conv2d, nn.Linear)) and fqn != "fc2"]
    pruner.prepare(model, config)
    if step:
        pruner.step()
    return model, pruner


def batches(device="cpu", steps=STEPS, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 3, SIZE, SIZE, generator=generator).to(device),
             torch.randint(CLASSES, (BATCH,), generator=generator).to(device)) for _ in range(steps)]


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def train_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def live_masks(model):
    """{tensor fqn: (mask, the tensor the model computes with)} of a model
    pruned by ChannelPruner: parametrized, or converted (either target, eager
    or scripted)."""
    if any(parametrize.is_parametrized(module) for module in model.modules()):
        return {f"{fqn}.{name}": (parametrization[0].mask, getattr(module, name))
                for fqn, module in model.named_modules() if parametrize.is_parametrized(module)
                for name, parametrization in module.parametrizations.items()}
    sparsities = fake_sparsities(model)  # the TorchScript target's: a scripted module's tensor is a property
    result = {}
    for fqn, mask in torch_sparsity.masks(model).items():
        module_fqn, _, name = fqn.rpartition(".")
        module = functools.reduce(getattr, module_fqn.split("."), model)  # ScriptModules have no get_submodule
        if fqn in sparsities:
            result[fqn] = (mask, sparsities[fqn].forward(getattr(module, name + "_original")))
        else:
            result[fqn] = (mask, getattr(module, name))
    return result


def assert_masked_slices_zero(model, expected_masks, what=""):
    """The model's masks are ``expected_masks`` and every entry they mask
    is exactly zero in the tensor the model computes with."""
    masks = live_masks(model)
    assert masks.keys() == expected_masks.keys(), what
    for fqn, (mask, tensor) in masks.items():
        assert torch.equal(mask.bool(), expected_masks[fqn].bool()), f"{what}: {fqn}"
        assert not tensor[pruned_entries(mask, tensor)].any(), f"{what}: {fqn}"


def masks_of(model):
    return {fqn: mask.clone() for fqn, (mask, _) in live_masks(model).items()}


def masked_channels(model, pruner):
    """Where the masked channels run: per module, the indices of its input
    (a Conv/Linear reading them) and of its output (a Conv/Linear or
    BatchNorm making them) that are masked channels. Each channel is masked
    in all its slices or in none."""
    masks = masks_of(model)
    inputs, outputs = {}, {}
    for group in pruner.pruned_groups():
        for channel in group.channels:
            kept = {bool(masks[fqn][index]) for fqn, dim, index in channel if fqn in masks and dim == 0}
            assert len(kept) == 1, channel
            if kept == {True}:
                continue
            for fqn, dim, index in channel:
                module_fqn = fqn.rpartition(".")[0]
                reads = dim == 1 and isinstance(model.get_submodule(module_fqn), (nn.Conv2d, nn.Linear))
                (inputs if reads else outputs).setdefault(module_fqn, set()).add(index)
    assert inputs and outputs
    return inputs, outputs


def run_checking_activations(model, pruner, x):
    """model(x), asserting that every masked channel is exactly zero where
    it is made and where it is read."""
    inputs, outputs = masked_channels(model, pruner)
    largest = {}

    def record(key, index, tensor):
        largest[key] = tensor[:, sorted(index)].abs().max().item()

    handles = [model.get_submodule(fqn).register_forward_pre_hook(
        lambda module, args, fqn=fqn, index=index: record(("input", fqn), index, args[0]))
        for fqn, index in inputs.items()]
    handles += [model.get_submodule(fqn).register_forward_hook(
        lambda module, args, out, fqn=fqn, index=index: record(("output", fqn), index, out))
        for fqn, index in outputs.items()]
    try:
        output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert len(largest) == len(inputs) + len(outputs)
    assert all(value == 0 for value in largest.values()), {k: v for k, v in largest.items() if v}
    return output


def assert_shrinks_exactly(model, x):
    """shrink removes exactly the masked channels of every Conv/Linear and
    the shrunk model computes the masked model's output (eval)."""
    model.eval()
    report = shrink_report(model, x)
    masks = masks_of(model)
    for fqn, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            mask = masks.get(f"{fqn}.weight")  # fc2's is not masked
            masked = [] if mask is None else torch.nonzero(~mask.bool()).flatten().tolist()
            assert report.removed_channels.get(fqn, []) == masked, fqn
    with torch.no_grad():
        expected, actual = model(x), report.model(x)
    assert max_abs_diff(actual, expected) <= 1e-5 * expected.abs().max().item()
    assert report.after.parameters < report.before.parameters


@pytest.fixture(scope="module")
def pruned(device):
    """The pruned TinyResNet at level 0.5 (tests train deep copies) and its masks."""
    model, pruner = pruned_tiny(device=device)
    return SimpleNamespace(model=model, pruner=pruner, masks=masks_of(model), device=device)


def pruned_copy(pruned):
    """A deep copy of the pruned model (a deep copy of a torch.ao.pruning
    sparsifier keeps only its groups and state, so tests read the channels
    from the fixture's pruner)."""
    return copy.deepcopy(pruned.model)


# ---------------------------------------------------------------- eager


def test_eager_training_keeps_masked_channels_zero_and_shrinks_exactly(pruned):
    model, pruner = pruned_copy(pruned), pruned.pruner
    model.train()
    optimizer = sgd(model)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    for step, (x, y) in enumerate(batches(pruned.device)):
        optimizer.zero_grad()
        nn.functional.cross_entropy(run_checking_activations(model, pruner, x), y).backward()
        optimizer.step()
        assert_masked_slices_zero(model, pruned.masks, f"step {step}")
    after = model.state_dict()
    assert all(not torch.equal(after[name], value) for name, value in before.items()
               if name.endswith(("original", "bias", "running_mean", "running_var")))
    x = batches(pruned.device, steps=1, seed=2)[0][0]
    with torch.no_grad():
        run_checking_activations(model.eval(), pruner, x)  # the running statistics of masked channels are not zero
    assert_shrinks_exactly(model, x)


def test_a_scheduler_raising_the_level_between_epochs_keeps_every_mask_live(device):
    """LambdaSL takes the level from 0.25 to 0.75 over three epochs,
    ChannelPruner stepping after each: a rise masks more channels of each
    group (those already masked stay masked: their slices are zero, so they
    rank lowest), and the model trains on with all of them zero."""
    model, pruner = pruned_tiny(level=0.25, device=device, step=False)
    scheduler = LambdaSL(pruner, lambda epoch: epoch + 1)
    model.train()
    optimizer = sgd(model)
    masks, counts = masks_of(model), []
    for epoch in range(4):
        for step, (x, y) in enumerate(batches(device, seed=epoch)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(run_checking_activations(model, pruner, x) if epoch else model(x), y).backward()
            optimizer.step()
            assert_masked_slices_zero(model, masks, f"epoch {epoch} step {step}")
        if epoch == 3:
            break
        pruner.step()
        scheduler.step()
        new_masks = masks_of(model)
        for fqn, mask in new_masks.items():
            assert not (mask.bool() & ~masks[fqn].bool()).any(), f"epoch {epoch}: {fqn} unmasked an entry"
        masks = new_masks
        counts.append([group.pruned for group in pruner.pruned_groups()])
    sizes = [len(group.channels) for group in pruner.pruned_groups()]
    assert counts == [[int(level * size) for size in sizes] for level in (0.25, 0.5, 0.75)]
    x = batches(device, steps=1, seed=9)[0][0]
    with torch.no_grad():
        run_checking_activations(model.eval(), pruner, x)
    assert_shrinks_exactly(model, x)


# ---------------------------------------------------------------- converted


@pytest.mark.parametrize("form", ["torchscript", "torchscript-scripted", "export"])
def test_converted_model_trains_as_the_pruned_one(pruned, form):
    """Converted (and scripted), trained step by step beside the pruned
    eager model on the same batches: the same losses and state within 1e-6
    of their scale (the same operations on the same values), the masked
    slices exactly zero after every step."""
    eager = pruned_copy(pruned)
    converted = convert(eager, target=form.split("-")[0])
    if form.endswith("scripted"):
        converted = torch.jit.script(converted)
    eager.train(), converted.train()
    optimizers = sgd(eager), sgd(converted)
    for step, (x, y) in enumerate(batches(pruned.device)):
        expected, actual = (train_step(m, o, x, y) for m, o in zip((eager, converted), optimizers))
        assert abs(actual.item() - expected.item()) <= 1e-6 * abs(expected.item()), f"step {step}"
        assert_masked_slices_zero(converted, pruned.masks, f"step {step}")
    assert_states_close(converted.state_dict(), eager.state_dict(), 1e-6)


def assert_states_close(actual, eager, tolerance):
    """State dicts within ``tolerance`` of each value's scale, by converted
    names."""
    actual = {converted_name(k): v for k, v in actual.items()}
    expected = {converted_name(k): v for k, v in eager.items()}
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        diff = max_abs_diff(actual[name].double(), value.double())
        assert diff <= tolerance * value.double().abs().max().item() + 1e-8, name


# ---------------------------------------------------------------- torch.compile


def test_compiled_training_of_the_pruned_model_matches_eager(pruned):
    """The parametrized model under torch.compile (inductor, forward and
    backward) beside the eager one: losses and state within 1e-5 of their
    scale (inductor's reductions add in another order), masked slices zero."""
    eager = pruned_copy(pruned)
    twin = pruned_copy(pruned)
    eager.train(), twin.train()
    compiled = torch.compile(twin)
    optimizers = sgd(eager), sgd(twin)
    for step, (x, y) in enumerate(batches(pruned.device)):
        expected, actual = (train_step(m, o, x, y) for m, o in zip((eager, compiled), optimizers))
        assert abs(actual.item() - expected.item()) <= 1e-5 * abs(expected.item()), f"step {step}"
        assert_masked_slices_zero(twin, pruned.masks, f"step {step}")
    assert_states_close(twin.state_dict(), eager.state_dict(), 1e-5)


def test_compiled_training_of_the_export_target_matches_eager(pruned):
    """The export-target model under torch.compile beside the pruned eager
    model (end_to_end_models.assert_compiled_training_matches_eager: every
    gradient after each step and the state at the end within 1e-5 of their
    scale, pruned entries zero and without gradient)."""
    eager = pruned_copy(pruned)
    inputs = iter(x for x, _ in batches(pruned.device))
    converted = assert_compiled_training_matches_eager(eager.train(), lambda: next(inputs), 1e-5)
    assert_masked_slices_zero(converted, pruned.masks)


# ---------------------------------------------------------------- DDP


def _worker(rank, world, init_file, out):
    sys.path.insert(0, str(Path(__file__).parent))
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _train_and_save(rank, world, out)
        dist.barrier()  # neither rank tears down its connections while the other still talks
    finally:
        dist.destroy_process_group()


def _train_and_save(rank, world, out):
    model = ddp_model()
    wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = sgd(wrapped)
    for x, y in batches():
        train_step(wrapped, optimizer, x.chunk(world)[rank], y.chunk(world)[rank])
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out}.{rank}")


def ddp_model():
    """The pruned TinyResNet in training mode but its BatchNorms, which use
    their running statistics: in training mode each rank would normalize by
    its own half's statistics (CPU has no SyncBatchNorm), which is by design
    not what one process computes on the whole batch."""
    model, _ = pruned_tiny()
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return model


def test_two_processes_train_the_pruned_model_as_one(tmp_path):
    """DDP on two processes, each on half of every batch, against one process
    on the whole batch: parameters within 1e-6 of their scale (the gradient
    sums add in another order), masks equal and masked slices zero on both
    ranks."""
    out = tmp_path / "state"
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True)
    model = ddp_model()
    masks, before = masks_of(model), copy.deepcopy(model.state_dict())
    optimizer = sgd(model)
    for x, y in batches():
        train_step(model, optimizer, x, y)
    expected = model.state_dict()
    for rank in range(2):
        trained = torch.load(f"{out}.{rank}")
        assert trained.keys() == expected.keys()
        for name, value in expected.items():
            scale = value.abs().max().item() if value.is_floating_point() else 0
            assert max_abs_diff(trained[name].double(), value.double()) <= 1e-6 * scale + 1e-8, (rank, name)
            if name.endswith("original"):
                assert not torch.equal(value, before[name]), f"{name} did not train"
        model.load_state_dict(trained, strict=False)  # torch.ao.pruning's masks are not in a state dict
        assert_masked_slices_zero(model, masks, f"rank {rank}")
