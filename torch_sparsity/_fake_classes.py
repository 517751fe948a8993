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
    """What both fake classes share; ``_apply`` is the operator. Every method
    of the real classes has a counterpart here: torch logs a warning for each
    missing one whenever it fakes an object (every mask, every trace)."""

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

    def mask_getter(self) -> torch.Tensor:
        return self.mask

    def state_dict(self):
        return {}

    # The traced graph calls the real object's method; these return nothing.
    def update_mask(self, mask: torch.Tensor) -> None:
        pass

    def follow_dtype(self, x: torch.Tensor) -> None:
        # The fake mask takes the dtype the real one will.
        if x.is_floating_point() and self.mask.is_floating_point():
            self.mask = self.mask.to(x.dtype)

    def set_cache_enabled(self, enabled: bool) -> None:
        pass

    def clear_cache(self) -> None:
        pass

    # Tracing would record these answers as constants, true of the trace only.
    def sparsity_level(self):
        self._refuse("sparsity_level")

    def cache_enabled(self):
        self._refuse("cache_enabled")

    def cache_hits(self):
        self._refuse("cache_hits")

    def _refuse(self, method: str):
        raise RuntimeError(
            f"torch.classes.sparsity.{self._class_name}.{method}: torch.export and torch.compile would record its "
            "answer at trace time as a constant; call it outside the traced code"
        )


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
