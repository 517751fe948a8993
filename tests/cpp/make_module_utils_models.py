"""Writes the TorchScript models that sparsity_module_utils_tests loads.

  convertible_net.pt   scripted ConvertibleNet (tests/python/module_utils_models.py):
                       FakeSparsity-object layers behind interface-typed attributes,
                       a SparseLinear prototype, one scripted method per operator
  sparse_linear.pt     a scripted SparseLinear prototype on its own
  pruned_mlp.pt        Linear-ReLU-Linear pruned with torch.ao.pruning's
                       WeightNormSparsifier (prepare + step), then traced: the
                       parametrize layout
  pruned_mlp_input.pt  an input for pruned_mlp and its output, as buffers
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


class Tensors(nn.Module):
    def __init__(self, **tensors):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--library", required=True, help="libtorch_sparsity.so")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args()
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* are deprecated
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    torch.ops.load_library(args.library)
    from module_utils_models import ConvertibleNet, SparseLinear  # needs the library

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(ConvertibleNet()), str(out / "convertible_net.pt"))
    torch.jit.save(torch.jit.script(SparseLinear()), str(out / "sparse_linear.pt"))

    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(mlp, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    x = torch.randn(3, 8)
    traced = torch.jit.trace(mlp, x)
    torch.jit.save(traced, str(out / "pruned_mlp.pt"))
    with torch.no_grad():
        y = mlp(x)
    torch.jit.save(torch.jit.script(Tensors(x=x, y=y)), str(out / "pruned_mlp_input.pt"))
    print(f"wrote module-utility test models to {out}")


if __name__ == "__main__":
    main()
