"""Writes the scripted models that the C++ tests load, with what Python
computed on them: run by ctest (fixture python_models) before the C++ tests.

For each model NAME it writes NAME.pt (the scripted model) and
NAME_expected.pt (a scripted module whose buffers are the input, the output
and the gradient of output.square().sum() for each parameter, named
grad__<fqn with dots as __>). It also writes bad_*.pt archives with malformed
FakeSparsity states and bad_states.txt (file, expected message substring).
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))


def write_model(out: Path, name: str, model: torch.nn.Module, example: torch.Tensor):
    from sparsity_testing import random_weight_masks, save_tensor_bag, sparsify_with_plugin

    model.eval()
    sparsify_with_plugin(model, random_weight_masks(model, torch.bool))
    scripted = torch.jit.script(model)
    scripted.save(str(out / f"{name}.pt"))

    params = dict(scripted.named_parameters())
    output = scripted(example)
    grads = torch.autograd.grad(output.square().sum(), list(params.values()))
    tensors = {"input": example, "output": output}
    tensors.update({"grad__" + k.replace(".", "__"): g for k, g in zip(params, grads)})
    save_tensor_bag(out / f"{name}_expected.pt", tensors)


def write_bad_states(out: Path):
    from sparsity_testing import STATE_PATCHES, write_patched_archive

    class HoldsFakeSparsity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sparsity = torch.classes.sparsity.FakeSparsity(torch.ones(2))

        def forward(self, x):
            return self.sparsity.forward(x)

    good = out / "holds_fake_sparsity.pt"
    torch.jit.script(HoldsFakeSparsity()).save(str(good))
    # Plain substrings of the expected errors, for the C++ side.
    substrings = {
        "future version": "format version 7",
        "missing mask": "needs a 'mask' entry",
        "version of wrong type": "FakeSparsity: malformed pickled state: the format version is a value of type str",
    }
    lines = []
    for case, (old, new, _) in sorted(STATE_PATCHES.items()):
        bad = out / f"bad_{case.replace(' ', '_')}.pt"
        write_patched_archive(good, bad, old, new)
        lines.append(f"{bad.name}\t{substrings[case]}")
    (out / "bad_states.txt").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--library", required=True, help="libtorch_sparsity.so to load")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    torch.ops.load_library(args.library)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    import torchvision
    from sparsity_testing import SmallNet

    write_model(args.out, "small_net", SmallNet(), torch.randn(2, 3, 6, 6))
    write_model(args.out, "resnet18", torchvision.models.resnet18(weights=None), torch.randn(2, 3, 64, 64))
    write_bad_states(args.out)
    print(f"wrote the C++ tests' models to {args.out}")


if __name__ == "__main__":
    main()
