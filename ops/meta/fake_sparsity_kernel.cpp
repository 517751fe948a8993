// Meta kernels: shapes, dtypes and strides only, for fake tensors and
// torch.compile. They must allocate exactly as the real kernels do.

#include "ops/fake_sparsity_common.h"
#include "ops/registration.h"

#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace sparsity {
namespace ops {
namespace {

at::Tensor fake_sparsity_meta(const at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_sparsity_inputs("fake_sparsity", x, mask);
  return at::empty_like(
      x, x.options().dtype(detail::fake_sparsity_result_type(x, mask)));
}

at::Tensor& fake_sparsity__meta(at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_sparsity_inputs("fake_sparsity_", x, mask);
  return x;
}

at::Tensor fake_structured_sparsity_meta(const at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_structured_sparsity_inputs("fake_structured_sparsity", x, mask);
  return at::empty_like(
      x, x.options().dtype(detail::fake_sparsity_result_type(x, mask)));
}

} // namespace

SPARSITY_LIBRARY_IMPL(Meta, m) {
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity"),
      TORCH_FN(fake_sparsity_meta));
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity_"),
      TORCH_FN(fake_sparsity__meta));
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_structured_sparsity"),
      TORCH_FN(fake_structured_sparsity_meta));
}

} // namespace ops
} // namespace sparsity
