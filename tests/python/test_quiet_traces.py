"""Exporting or compiling a converted model prints nothing of its own: torch
logs a warning for each method of a mask object that the fake class lacks,
for every mask on every trace, unless the fake class has them all."""

import logging
import warnings

import pytest
import torch
from torch import nn

from end_to_end_models import prune_structured, small_pruned_model
from sparsity_testing import assert_outputs_equal
from torch_sparsity._fake_classes import FakeFakeSparsity, FakeFakeStructuredSparsity
from torch_sparsity.convert import convert
from torch_sparsity.sparsifiers import prepare_with_masks

# The TorchScript target's objects export non-strict only (strict export
# refuses them: test_export.py).
TRACES = [("torchscript", "export"), ("torchscript", "compile"), ("export", "export"),
          ("export", "strict export"), ("export", "compile")]
# FakeSparsity objects; FakeStructuredSparsity objects; those and the
# structured pruner's bias hook, which reads the mask.
PRUNINGS = ["weight_norm", "rows", "rows_and_biases"]


def _pruned_model(pruning):
    if pruning == "weight_norm":
        return small_pruned_model()
    bias = pruning == "rows_and_biases"
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10, bias=bias)
    )
    prune_structured(model, "saliency")
    return model


def _trace(how, model, x):
    if how == "compile":
        # Dynamo does not guard on forward hooks (skip_nnmodule_hook_guards):
        # the code compiled for another case's modules of the same classes,
        # without the bias hook, would run again.
        torch._dynamo.reset()
        return torch.compile(model)(x)
    return torch.export.export(model, (x,), strict=how == "strict export").module()(x)


@pytest.fixture(scope="module")
def warmed_up(device):
    """What torch prints once per process (its first compile, say) is not
    the model's: a plain model goes through each trace first."""
    plain = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).to(device).eval()
    with torch.no_grad():
        for how in ("export", "strict export", "compile"):
            _trace(how, plain, torch.randn(2, 3, device=device))


@pytest.fixture
def torch_log(caplog):
    """caplog, for torch's loggers too (they do not pass records on to the
    root logger, where caplog listens)."""
    torch_logger = logging.getLogger("torch")
    torch_logger.addHandler(caplog.handler)
    yield caplog
    torch_logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("target,how,pruning", [(t, h, p) for t, h in TRACES for p in PRUNINGS])
def test_tracing_a_converted_model_prints_nothing(warmed_up, device, capfd, torch_log, target, how, pruning):
    eager = _pruned_model(pruning).to(device).eval()
    converted = convert(eager, target=target)
    x = torch.randn(2, 3, 6, 6, device=device)
    capfd.readouterr()
    torch_log.clear()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _trace(how, converted, x)
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == "", printed
    assert [r.getMessage() for r in torch_log.records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught] == []
    with torch.no_grad():
        assert_outputs_equal(out, eager(x))


class _CallsMaskMethod(nn.Module):
    """A TorchScript-target Linear whose forward calls a method of its mask
    object."""

    def __init__(self, method):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.method = method

    def forward(self, x, new_mask):
        sparsity = self.linear.weight_sparsity
        if self.method == "update_mask":
            sparsity.update_mask(new_mask)
            return self.linear(x)
        return x * getattr(sparsity, self.method)()


def _calling(method):
    model = _CallsMaskMethod(method)
    prepare_with_masks(model, {"linear.weight": torch.ones(4, 4)})
    return convert(model, check_scriptable=False).eval()


def test_traced_update_mask_runs_on_the_real_object():
    model, x, new_mask = _calling("update_mask"), torch.randn(2, 4), torch.rand(4, 4) > 0.5
    with torch.no_grad():
        program = torch.export.export(model, (x, torch.ones(4, 4, dtype=torch.bool)), strict=False)
        out = program.module()(x, new_mask)
    assert torch.equal(model.linear.weight_sparsity.mask, new_mask)
    assert_outputs_equal(out, x @ (model.linear.weight_original * new_mask).t() + model.linear.bias)


@pytest.mark.parametrize("method", ["sparsity_level", "cache_enabled", "cache_hits"])
def test_tracing_a_method_whose_answer_would_become_a_constant_is_refused(method):
    model, x = _calling(method), torch.randn(2, 4)
    with torch.no_grad(), pytest.raises(RuntimeError, match=f"FakeSparsity.{method}: .* as a constant"):
        torch.export.export(model, (x, torch.ones(4, 4, dtype=torch.bool)), strict=False)


@pytest.mark.parametrize("real, fake", [("FakeSparsity", FakeFakeSparsity),
                                        ("FakeStructuredSparsity", FakeFakeStructuredSparsity)])
def test_the_fake_classes_have_every_method(real, fake):
    # (Torch does not look for these on a fake object.)
    flattening = {"__obj_flatten__", "__getstate__", "__setstate__"}
    methods = set(getattr(torch.classes.sparsity, real)(torch.ones(2))._method_names()) - flattening
    assert methods - set(dir(fake)) == set()
