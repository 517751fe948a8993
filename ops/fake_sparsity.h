#pragma once

// C++ API of the fake_sparsity operators. Both calls go through the
// dispatcher, so C++ callers get the same kernels, device handling and
// autograd as TorchScript and Python callers.

#include <ATen/core/Tensor.h>

namespace sparsity {
namespace ops {

// mask * x, with PyTorch's type promotion; mask.shape must equal x.shape.
at::Tensor fake_sparsity(const at::Tensor& x, const at::Tensor& mask);

// x.mul_(mask): squashes a mask into a tensor in place and returns x.
at::Tensor& fake_sparsity_(at::Tensor& x, const at::Tensor& mask);

} // namespace ops
} // namespace sparsity
