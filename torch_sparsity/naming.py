"""The names ``convert`` gives a pruned tensor ``T`` and the key under which an
AOTInductor package records its masks. The C++ side (``aoti/``, ``tools/``)
reads the same names from ``classes/naming.h``; a test pins the two equal."""

__all__ = [
    "MASK_SUFFIX",
    "MASKS_METADATA_KEY",
    "ORIGINAL_SUFFIX",
    "PRUNE_MASK_SUFFIX",
    "PRUNE_ORIG_SUFFIX",
    "SPARSITY_SUFFIX",
]

ORIGINAL_SUFFIX = "_original"  # T_original: the tensor the mask applies to
SPARSITY_SUFFIX = "_sparsity"  # target "torchscript": the FakeSparsity object
MASK_SUFFIX = "_mask"  # target "export": the mask buffer
MASKS_METADATA_KEY = "torch_sparsity.masks"  # package metadata: "fqn=constant;..."

# torch.nn.utils.prune's own names, which convert reads.
PRUNE_ORIG_SUFFIX = "_orig"
PRUNE_MASK_SUFFIX = "_mask"
