#pragma once

// C++ API of the fake_sparsity and fake_structured_sparsity operators. Every
// call goes through the dispatcher, so C++ callers get the same kernels,
// device handling and autograd as TorchScript and Python callers.

#include <ATen/core/Tensor.h>

namespace sparsity {
namespace ops {

// mask * x, with PyTorch's type promotion; mask.shape must equal x.shape.
at::Tensor fake_sparsity(const at::Tensor& x, const at::Tensor& mask);

// x.mul_(mask): squashes a mask into a tensor in place and returns x.
at::Tensor& fake_sparsity_(at::Tensor& x, const at::Tensor& mask);

// mask.reshape(-1, 1, ...) * x: a row mask of shape [x.size(0)] applied to
// every slice x[i], with PyTorch's type promotion (torch.ao.pruning's
// FakeStructuredSparsity). Squash with x.mul_(mask.reshape(-1, 1, ...)).
at::Tensor fake_structured_sparsity(const at::Tensor& x, const at::Tensor& mask);

} // namespace ops
} // namespace sparsity
