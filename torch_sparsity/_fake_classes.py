"""Fake classes for the plugin's TorchScript classes, so that torch.export
(non-strict) and torch.compile can trace a module that holds them: when a
method of a torch.classes.sparsity.FakeSparsity is called under tracing, its
fake counterpart here computes the result's shape and dtype, and the graph
records a call of the real object (torch.ops.higher_order.call_torchbind).

That path is for inference: autograd does not go through call_torchbind
(issue 11 reports a weight gradient dropped without a word under
torch.compile), so the fake forward refuses to trace where a gradient would
be needed. A model to train under torch.compile, or to export for training,
is convert(model, target="export")."""

import torch

__all__ = ["FakeFakeSparsity"]


@torch._library.register_fake_class("sparsity::FakeSparsity")
class FakeFakeSparsity:
    """Stands in for torch.classes.sparsity.FakeSparsity while tracing."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    @classmethod
    def __obj_unflatten__(cls, flattened):
        return cls(**dict(flattened))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.mask.requires_grad):
            raise RuntimeError(
                "torch.classes.sparsity.FakeSparsity: torch.export and torch.compile trace its forward for "
                "inference only (no gradient flows through a TorchScript object's method there); run under "
                "torch.no_grad(), or convert the model with convert(model, target='export') to train or export "
                "it for training"
            )
        return torch.ops.sparsity.fake_sparsity(x, self.mask)

    def get_mask(self) -> torch.Tensor:
        return self.mask

    def state_dict(self):
        return {}
