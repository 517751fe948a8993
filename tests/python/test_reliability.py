"""Bad input that an audit of the operators found refused only after a
write: each call must raise before it changes anything, as aten's
in-place operators do."""

from typing import Any

import pytest
import torch
from module_utils_models import ConvertibleNet, LinearLike

from torch_sparsity import utils

fake_sparsity_ = torch.ops.sparsity.fake_sparsity_


def _views_that_cannot_be_written():
    leaf = torch.randn(4, 3, requires_grad=True)
    yield "view of a leaf that requires grad", leaf, lambda: leaf[0:2], r"a view of a leaf Variable that requires grad"
    base = torch.randn(3, 4, requires_grad=True)
    product = base * 1
    yield "output of unbind", product, lambda: product.unbind()[1], r"Output 1 of Unbind is a view and is being modified inplace"
    split_base = torch.randn(4, 3, requires_grad=True) * 1
    yield "output of split", split_base, lambda: split_base.split(2)[0], r"Output 0 of Split\w* is a view and is being modified inplace"


@pytest.mark.parametrize("case", list(_views_that_cannot_be_written()), ids=lambda c: c[0])
def test_inplace_on_views_aten_refuses_is_refused_before_writing(case):
    _, owner, make_view, message = case
    view = make_view()
    before = owner.detach().clone()
    with pytest.raises(RuntimeError, match=message):
        view.mul_(torch.zeros(view.shape))  # aten's own refusal, for reference
    with pytest.raises(RuntimeError, match=message):
        fake_sparsity_(view, torch.zeros(view.shape, dtype=torch.bool))
    assert torch.equal(owner.detach(), before)


def test_inplace_on_an_inference_tensor_outside_inference_mode_is_refused_before_writing():
    with torch.inference_mode():
        x = torch.randn(5)
    before = x.clone()
    mask = torch.zeros(5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"fake_sparsity_: x is an inference tensor, which can be modified in "
                                           r"place only in inference mode"):
        fake_sparsity_(x, mask)
    assert torch.equal(x, before)
    # aten refuses too, though only once it has written (torch 2.14.1).
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        x.mul_(mask)
    with torch.inference_mode():
        y = torch.randn(5)
        fake_sparsity_(y, mask)
    assert not y.any()


@pytest.mark.parametrize("holder", ["FakeSparsity", "FakeStructuredSparsity"])
def test_update_mask_of_an_inference_mask_outside_inference_mode_changes_nothing(holder):
    with torch.inference_mode():
        mask = torch.ones(4)
        held = getattr(torch.classes.sparsity, holder)(mask)
    with pytest.raises(RuntimeError, match=rf"{holder}.update_mask: the held mask is an inference tensor"):
        held.update_mask(torch.zeros(4))
    assert torch.equal(mask, torch.ones(4))
    with torch.inference_mode():
        held.update_mask(torch.zeros(4))
    assert not mask.any()


@pytest.mark.parametrize("holder", ["FakeSparsity", "FakeStructuredSparsity"])
def test_update_mask_from_a_meta_tensor_is_the_class_error_and_changes_nothing(holder):
    # (the fuzzer's note: it was torch's NotImplementedError from copy_)
    mask = torch.ones(4)
    held = getattr(torch.classes.sparsity, holder)(mask)
    with pytest.raises(RuntimeError, match=rf"{holder}.update_mask: the new mask is a meta tensor"):
        held.update_mask(torch.zeros(4, device="meta"))
    assert held.mask is mask and torch.equal(mask, torch.ones(4))


# Malformed pickled states (the audit's fuzzing found 689 of 3898 mutated
# archives failing with torch's "isGenericDict() INTERNAL ASSERT FAILED"):
# __setstate__ takes any value and says what the state should be.
@torch.jit.script
def _set_fake_sparsity_state(obj: torch.classes.sparsity.FakeSparsity, state: Any):
    obj.__setstate__(state)


@torch.jit.script
def _set_fake_structured_sparsity_state(obj: torch.classes.sparsity.FakeStructuredSparsity, state: Any):
    obj.__setstate__(state)


MALFORMED_STATES = {
    "(1, 5)": ((1, 5), r"the tensors are a value of type int \(expected \(version: int, \{'mask': Tensor\}\)\)"),
    "an int": (5, r"got a value of type int \(expected"),
    "a 3-tuple": ((1, {"mask": torch.ones(2)}, 3), r"got a value of type Tuple\[int, Dict\[str, Tensor\], int\]"),
    "version of type str": (("1", {"mask": torch.ones(2)}), r"the format version is a value of type str"),
    "mask not a tensor": ((1, {"mask": 3}), r"'mask' is a value of type int, not a Tensor"),
    "extra entry": ((1, {"mask": torch.ones(2), "x": torch.ones(1)}), r"version 1 holds only 'mask', but got 2 entries"),
    "no mask": ((1, {"x": torch.ones(1)}), r"version 1 needs a 'mask' entry"),
    "future version": ((2, {"mask": torch.ones(2)}), r"cannot load a pickled state of format version 2"),
}


@pytest.mark.parametrize("holder", ["FakeSparsity", "FakeStructuredSparsity"])
@pytest.mark.parametrize("case", list(MALFORMED_STATES))
def test_malformed_pickled_states_say_what_the_state_should_be(case, holder):
    state, message = MALFORMED_STATES[case]
    obj = getattr(torch.classes.sparsity, holder)(torch.ones(2))
    set_state = _set_fake_sparsity_state if holder == "FakeSparsity" else _set_fake_structured_sparsity_state
    with pytest.raises(RuntimeError, match=rf"{holder}: (malformed pickled state: )?" + message):
        set_state(obj, state)
    set_state(obj, (1, {"mask": torch.zeros(2)}))  # a well-formed one
    assert torch.equal(obj.mask, torch.zeros(2))


# ------------------------------------------------------ module utilities


class SelfSlot(torch.nn.Module):
    """A module that implements LinearLike and has a LinearLike slot."""

    slot: LinearLike

    def __init__(self, inner):
        super().__init__()
        self.slot = inner

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.slot(input)


def test_set_submodule_refuses_a_cycle_and_changes_nothing():
    """set_submodule(s, "slot", s) through an interface-typed slot made a
    module its own submodule: module_to_fqn then overflowed the stack and
    swap_module never returned."""
    inner = torch.nn.Linear(2, 2)
    model = torch.jit.script(SelfSlot(SelfSlot(inner)))
    for name, new in [("slot", model), ("slot.slot", model), ("slot.slot", model.slot)]:
        with pytest.raises(RuntimeError, match=r"would make a module its own submodule"):
            utils.set_submodule(model, name, new)
    # Nothing changed, and the walks end.
    assert utils.module_to_fqn(model, utils.fqn_to_module(model, "slot.slot")) == "slot.slot"
    assert isinstance(utils.fqn_to_module(model, "slot.slot.weight"), torch.Tensor)
    assert utils.module_to_fqn(model, torch.jit.script(torch.nn.Linear(2, 2))) is None
    x = torch.randn(3, 2)
    assert torch.equal(model(x), inner(x))


def test_fqn_to_module_never_hands_out_a_custom_class_capsule():
    """A custom class object's internal slot 'capsule' holds the C++ object:
    wrapped by Python it crashed the process when used."""
    torch.manual_seed(0)
    model = torch.jit.script(ConvertibleNet())
    assert utils.fqn_to_module(model, "fc1.weight_sparsity.capsule") is None
    assert torch.ops.sparsity.fqn_to_module(model._c, "fc1.weight_sparsity.capsule") is None
    info = utils.get_arg_info_from_tensor_fqn(model, "fc1.weight_sparsity.capsule")
    assert info["module"] is not None and info["tensor_name"] == "capsule"
    assert isinstance(utils.fqn_to_module(model, "fc1.weight_sparsity.mask"), torch.Tensor)  # properties still work


class RaisingProperty(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(2, 2)
        self.fail = False  # scripting reads the property once

    @property
    def broken(self) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("this getter always fails")
        return self.inner.weight

    def forward(self, x):
        return self.inner(x)


def test_a_raising_property_on_the_path_is_a_runtime_error():
    scripted = torch.jit.script(RaisingProperty())
    scripted.fail = True
    for call in (lambda: utils.fqn_to_module(scripted, "broken"),
                 lambda: utils.get_arg_info_from_tensor_fqn(scripted, "broken.weight"),
                 lambda: torch.ops.sparsity.fqn_to_module(scripted._c, "broken")):
        with pytest.raises(RuntimeError, match=r"(?s)the property 'broken' of an object of type .*RaisingProperty raised "
                                               r"an error while reading the path 'broken.*this getter always fails"):
            call()
