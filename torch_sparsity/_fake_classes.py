"""Fake classes for the plugin's TorchScript classes, so that torch.export
(non-strict) and torch.compile can trace a module that holds them: when a
method of a torch.classes.sparsity.FakeSparsity (or FakeStructuredSparsity) is called under tracing, its
fake counterpart here computes the result's shape and dtype, and the graph
records a call of the real object (torch.ops.higher_order.call_torchbind).

That path is for inference: autograd does not go through call_torchbind
(a weight's gradient would be dropped without a word under torch.compile),
so the fake forward refuses to trace where a gradient would
be needed. A model to train under torch.compile, or to export for training,
is convert(model, target="export")."""

import torch

__all__ = ["FakeFakeSparsity", "FakeFakeStructuredSparsity"]


class _FakeMaskHolder:
    """What both fake classes share; ``_apply`` is the operator."""

    _class_name = ""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.mask.requires_grad):
            raise RuntimeError(
                f"torch.classes.sparsity.{self._class_name}: torch.export and torch.compile trace its forward for "
                "inference only (no gradient flows through a TorchScript object's method there); run under "
                "torch.no_grad(), or convert the model with convert(model, target='export') to train or export "
                "it for training"
            )
        return self._apply(x, self.mask)

    def get_mask(self) -> torch.Tensor:
        return self.mask

    def state_dict(self):
        return {}


def _register(qualified_name: str):
    """register_fake_class, which looks for __obj_unflatten__ in the class's
    own __dict__."""

    def register(cls):
        cls.__obj_unflatten__ = classmethod(lambda cls, flattened: cls(**dict(flattened)))
        return torch._library.register_fake_class(qualified_name)(cls)

    return register


@_register("sparsity::FakeSparsity")
class FakeFakeSparsity(_FakeMaskHolder):
    """Stands in for torch.classes.sparsity.FakeSparsity while tracing."""

    _class_name = "FakeSparsity"

    @staticmethod
    def _apply(x, mask):
        return torch.ops.sparsity.fake_sparsity(x, mask)


@_register("sparsity::FakeStructuredSparsity")
class FakeFakeStructuredSparsity(_FakeMaskHolder):
    """Stands in for torch.classes.sparsity.FakeStructuredSparsity while tracing."""

    _class_name = "FakeStructuredSparsity"

    @staticmethod
    def _apply(x, mask):
        return torch.ops.sparsity.fake_structured_sparsity(x, mask)
