// The one place that declares the fake_sparsity schemas, and the C++ wrappers
// that call them through the dispatcher.

#include "ops/fake_sparsity.h"
#include "ops/registration.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace sparsity {
namespace ops {

at::Tensor fake_sparsity(const at::Tensor& x, const at::Tensor& mask) {
  C10_LOG_API_USAGE_ONCE("torch_sparsity.ops.fake_sparsity");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsity::fake_sparsity", "")
                       .typed<decltype(fake_sparsity)>();
  return op.call(x, mask);
}

at::Tensor& fake_sparsity_(at::Tensor& x, const at::Tensor& mask) {
  C10_LOG_API_USAGE_ONCE("torch_sparsity.ops.fake_sparsity_");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsity::fake_sparsity_", "")
                       .typed<decltype(fake_sparsity_)>();
  return op.call(x, mask);
}

at::Tensor fake_structured_sparsity(const at::Tensor& x, const at::Tensor& mask) {
  C10_LOG_API_USAGE_ONCE("torch_sparsity.ops.fake_structured_sparsity");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsity::fake_structured_sparsity", "")
                       .typed<decltype(fake_structured_sparsity)>();
  return op.call(x, mask);
}

SPARSITY_LIBRARY_FRAGMENT(m) {
  m.def(TORCH_SELECTIVE_SCHEMA(
      "sparsity::fake_sparsity(Tensor x, Tensor mask) -> Tensor"));
  m.def(TORCH_SELECTIVE_SCHEMA(
      "sparsity::fake_sparsity_(Tensor(a!) x, Tensor mask) -> Tensor(a!)"));
  m.def(TORCH_SELECTIVE_SCHEMA(
      "sparsity::fake_structured_sparsity(Tensor x, Tensor mask) -> Tensor"));
}

} // namespace ops
} // namespace sparsity
