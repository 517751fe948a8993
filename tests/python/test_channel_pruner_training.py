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
import torchvision
from torch import nn
from torch.ao.pruning import LambdaSL
from torch.nn.utils import parametrize

import torch_sparsity
from end_to_end_models import pruned_entries
from sparsity_testing import max_abs_diff
from torch_sparsity.convert import convert, converted_name, fake_sparsities
from torch_sparsity.shrinking import shrink_report
from torch_sparsity.sparsifiers import ChannelPruner

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),  # bit-for-bit gradients (conftest.py)
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


def randomize_batchnorms(model):
    """Random BatchNorm statistics and affine parameters, so that a masked
    channel's statistics and (unmasked) weight and bias are not zero."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.5, 0.5),
                                          (module.running_mean, -0.5, 0.5), (module.running_var, 0.5, 1.5)):
                    tensor.uniform_(low, high)


def prepare_pruner(model, size, level, device, step, head):
    """ChannelPruner at ``level`` prepared on every Conv/Linear weight of
    ``model`` but that of ``head`` (its channels are the model's output)
    and, with ``step``, stepped once. Returns (model, pruner)."""
    randomize_batchnorms(model)
    model.to(device)
    pruner = ChannelPruner(torch.randn(2, 3, size, size, device=device), level)
    pruner.prepare(model, [{"tensor_fqn": f"{fqn}.weight"} for fqn, module in model.named_modules()
                           if isinstance(module, (nn.Conv2d, nn.Linear)) and fqn != head])
    if step:
        pruner.step()
    return model, pruner


def pruned_tiny(level=0.5, device="cpu", step=True):
    torch.manual_seed(0)
    return prepare_pruner(TinyResNet(), SIZE, level, device, step, head="fc2")


def pruned_resnet18(level=0.5, device="cpu", step=True):
    torch.manual_seed(0)
    return prepare_pruner(torchvision.models.resnet18(num_classes=CLASSES), 32, level, device, step, head="fc")


def batches(device="cpu", steps=STEPS, seed=1, size=SIZE):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 3, size, size, generator=generator).to(device),
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
    assert_live_masks_zero(live_masks(model), expected_masks, what)


def assert_live_masks_zero(live, expected_masks, what=""):
    assert live.keys() == expected_masks.keys(), what
    for fqn, (mask, tensor) in live.items():
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
    """The pruned TinyResNet at level 0.5 (tests train deep copies of it) and its masks."""
    model, pruner = pruned_tiny(device=device)
    return SimpleNamespace(model=model, pruner=pruner, masks=masks_of(model), device=device)


# ---------------------------------------------------------------- eager


@pytest.mark.parametrize("make, size", [(pruned_tiny, SIZE), (pruned_resnet18, 32)], ids=["tiny", "resnet18"])
def test_eager_training_keeps_masked_channels_zero_and_shrinks_exactly(device, make, size):
    model, pruner = make(device=device)
    masks = masks_of(model)
    model.train()
    optimizer = sgd(model)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    for step, (x, y) in enumerate(batches(device, size=size)):
        optimizer.zero_grad()
        nn.functional.cross_entropy(run_checking_activations(model, pruner, x), y).backward()
        optimizer.step()
        assert_masked_slices_zero(model, masks, f"step {step}")
    after = model.state_dict()
    assert all(not torch.equal(after[name], value) for name, value in before.items()
               if name.endswith(("original", "bias", "running_mean", "running_var")))
    x = batches(device, steps=1, seed=2, size=size)[0][0]
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
        if epoch < 3:
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


FORMS = ["torchscript", "torchscript-scripted", "export"]


def converted_form(model, form, inplace=False):
    converted = convert(model, target=form.split("-")[0], inplace=inplace)
    return torch.jit.script(converted) if form.endswith("scripted") else converted


def assert_states_close(actual, eager, tolerance=0.0):
    """State dicts equal by converted names, each value within ``tolerance``
    of its scale (0: bit for bit)."""
    actual = {converted_name(k): v for k, v in actual.items()}
    expected = {converted_name(k): v for k, v in eager.items()}
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        diff = max_abs_diff(actual[name].double(), value.double())
        assert diff <= tolerance * value.double().abs().max().item(), name


@pytest.mark.parametrize("form", FORMS)
def test_converted_model_trains_as_the_pruned_one(pruned, form):
    """Converted (and scripted), trained step by step beside the pruned
    eager model on the same batches: the same losses and state bit for bit
    (the same operations on the same values), the masked slices exactly
    zero after every step."""
    eager = copy.deepcopy(pruned.model)
    converted = converted_form(eager, form)
    eager.train(), converted.train()
    optimizers = sgd(eager), sgd(converted)
    for step, (x, y) in enumerate(batches(pruned.device)):
        expected, actual = (train_step(m, o, x, y) for m, o in zip((eager, converted), optimizers))
        assert torch.equal(actual, expected), f"step {step}"
        assert_masked_slices_zero(converted, pruned.masks, f"step {step}")
    assert_states_close(converted.state_dict(), eager.state_dict())


@pytest.mark.parametrize("form", FORMS)
def test_pruner_keeps_stepping_the_model_it_converted_in_place(device, form):
    """convert(inplace=True) leaves the pruner's very masks in the converted
    model (the scripted one shares them): with LambdaSL raising the level
    from 0.25 to 0.75 between epochs and ChannelPruner stepping the
    converted model, masks and losses are those of the eager model pruned
    and trained alike, bit for bit, and the masked slices zero."""
    eager, eager_pruner = pruned_tiny(level=0.25, device=device, step=False)
    model, pruner = pruned_tiny(level=0.25, device=device, step=False)
    converted = converted_form(model, form, inplace=True)
    schedulers = [LambdaSL(p, lambda epoch: epoch + 1) for p in (eager_pruner, pruner)]
    eager.train(), converted.train()
    optimizers = sgd(eager), sgd(converted)
    for epoch in range(4):
        for step, (x, y) in enumerate(batches(device, seed=epoch)):
            expected, actual = (train_step(m, o, x, y) for m, o in zip((eager, converted), optimizers))
            assert torch.equal(actual, expected), f"epoch {epoch} step {step}"
            assert_masked_slices_zero(converted, masks_of(eager), f"epoch {epoch} step {step}")
        if epoch < 3:
            for p, scheduler in zip((eager_pruner, pruner), schedulers):
                p.step()
                scheduler.step()
    assert [group.pruned for group in pruner.pruned_groups()] == [int(0.75 * len(group.channels))
                                                                  for group in pruner.pruned_groups()]
    assert_states_close(converted.state_dict(), eager.state_dict())


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("form", ["parametrized", "export"])
def test_compiled_training_matches_eager(device, form):
    """The pruned model (parametrized, or converted to the export target)
    under torch.compile (inductor, forward and backward) beside the eager
    one, the level raised from 0.5 to 0.75 between two epochs (the eager
    pruner's new masks copied into the compiled model's, in place): losses
    and state within 1e-5 of their scale on the CPU, 1e-4 on a GPU
    (inductor's reductions add in another order, as in test_export.py),
    masked slices zero."""
    tolerance = 1e-5 if device == "cpu" else 1e-4
    eager, pruner = pruned_tiny(device=device)
    twin = copy.deepcopy(eager) if form == "parametrized" else convert(eager, target=form)
    eager.train(), twin.train()
    compiled = torch.compile(twin)
    optimizers = sgd(eager), sgd(twin)
    for epoch in range(2):
        for step, (x, y) in enumerate(batches(device, seed=epoch)):
            expected, actual = (train_step(m, o, x, y) for m, o in zip((eager, compiled), optimizers))
            what = f"epoch {epoch} step {step}"
            assert abs(actual.item() - expected.item()) <= tolerance * abs(expected.item()), what
            assert_masked_slices_zero(twin, masks_of(eager), what)
        if epoch == 0:
            for group in pruner.groups:
                group["sparsity_level"] = 0.75
            pruner.step()
            twin_masks = live_masks(twin)
            for fqn, mask in masks_of(eager).items():
                twin_masks[fqn][0].copy_(mask)
    assert_states_close(twin.state_dict(), eager.state_dict(), tolerance)


# ---------------------------------------------------------------- DDP


def _worker(rank, world, init_file, form, out):
    sys.path.insert(0, str(Path(__file__).parent))
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _train_and_save(rank, world, form, out)
        dist.barrier()  # neither rank tears down its connections while the other still talks
    finally:
        dist.destroy_process_group()


def _train_and_save(rank, world, form, out):
    model = ddp_model(form)
    wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = sgd(wrapped)
    for x, y in batches():
        train_step(wrapped, optimizer, x.chunk(world)[rank], y.chunk(world)[rank])
    live = {fqn: (mask.clone(), tensor.detach().clone()) for fqn, (mask, tensor) in live_masks(model).items()}
    torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "live": live},
               f"{out}.{rank}")


def ddp_model(form):
    """The pruned TinyResNet (``form`` "eager" or "export": converted to
    that target) in training mode but its BatchNorms, which use
    their running statistics: in training mode each rank would normalize by
    its own half's statistics (CPU has no SyncBatchNorm), which is by design
    not what one process computes on the whole batch."""
    model, _ = pruned_tiny()
    model = model if form == "eager" else convert(model, target=form)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return model


@pytest.mark.parametrize("form", ["eager", "export"])
def test_two_processes_train_the_pruned_model_as_one(tmp_path, form):
    """DDP on two processes, each on half of every batch, against one process
    on the whole batch: parameters within 1e-6 of their scale (the gradient
    sums add in another order), masks equal and masked slices zero on both
    ranks."""
    out = tmp_path / "state"
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), form, str(out)), nprocs=2, join=True)
    model = ddp_model(form)
    masks, before = masks_of(model), copy.deepcopy(model.state_dict())
    optimizer = sgd(model)
    for x, y in batches():
        train_step(model, optimizer, x, y)
    expected = model.state_dict()
    for rank in range(2):
        saved = torch.load(f"{out}.{rank}")
        trained = saved["state"]
        assert trained.keys() == expected.keys()
        for name, value in expected.items():
            scale = value.abs().max().item() if value.is_floating_point() else 0
            assert max_abs_diff(trained[name].double(), value.double()) <= 1e-6 * scale + 1e-8, (rank, name)
            if name.endswith("original"):
                assert not torch.equal(value, before[name]), f"{name} did not train"
        assert_live_masks_zero(saved["live"], masks, f"rank {rank}")
