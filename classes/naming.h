#pragma once

// The names torch_sparsity.convert gives a pruned tensor T, and the key under
// which an AOTInductor package records its masks, for the C++ side (aoti/,
// tools/). Python reads the same names from torch_sparsity/naming.py; a test
// (tests/python/test_naming.py) pins the two equal.

namespace sparsity::naming {

// T_original: the tensor the mask applies to.
inline constexpr const char* kOriginalSuffix = "_original";
// T_sparsity: the FakeSparsity object (target "torchscript").
inline constexpr const char* kSparsitySuffix = "_sparsity";
// T_mask: the mask buffer (target "export").
inline constexpr const char* kMaskSuffix = "_mask";
// Package metadata "fqn=constant;fqn=constant" (torch_sparsity.aoti.compile).
inline constexpr const char* kMasksMetadataKey = "torch_sparsity.masks";

} // namespace sparsity::naming
