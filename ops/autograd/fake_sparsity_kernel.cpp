// Autograd of fake_sparsity and fake_sparsity_, registered in C++ on the
// Autograd key so that a C++ program that loads a scripted model can
// backpropagate through it. The backward formulas call fake_sparsity itself,
// so they are differentiable again (double backward).

#include "ops/fake_sparsity.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <optional>

namespace sparsity {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_fake_sparsity_below_autograd(const at::Tensor& x, const at::Tensor& mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsity::fake_sparsity", "")
                       .typed<decltype(fake_sparsity)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, mask);
}

at::Tensor& call_fake_sparsity__below_autograd(at::Tensor& x, const at::Tensor& mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsity::fake_sparsity_", "")
                       .typed<decltype(fake_sparsity_)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, mask);
}

// d(mask * x)/dx = grad * mask and d/dmask = grad * x, each cast back to the
// dtype of the input it belongs to (the result may have a wider dtype).
variable_list mask_product_backward(
    AutogradContext* ctx,
    const at::Tensor& grad,
    const at::Tensor& x_value,
    const at::Tensor& mask) {
  at::Tensor grad_x, grad_mask;
  if (grad.defined()) {
    if (ctx->needs_input_grad(0)) {
      grad_x = fake_sparsity(grad, mask)
                   .to(ctx->saved_data["x_dtype"].toScalarType());
    }
    if (ctx->needs_input_grad(1)) {
      grad_mask = fake_sparsity(grad, x_value)
                      .to(ctx->saved_data["mask_dtype"].toScalarType());
    }
  }
  return {grad_x, grad_mask};
}

class FakeSparsityFunction
    : public torch::autograd::Function<FakeSparsityFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& mask) {
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["mask_dtype"] = mask.scalar_type();
    // Save only what the backward will read.
    ctx->save_for_backward(
        {mask.requires_grad() ? x : at::Tensor(),
         x.requires_grad() ? mask : at::Tensor()});
    return call_fake_sparsity_below_autograd(x, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return mask_product_backward(ctx, grads[0], saved[0], saved[1]);
  }
};

class FakeSparsityInplaceFunction
    : public torch::autograd::Function<FakeSparsityInplaceFunction> {
 public:
  // x_before: a copy of x taken before the write, needed for the gradient of
  // the mask (empty when the mask needs none). It is taken outside, with grad
  // mode on, so that it keeps its own graph back to x for double backward.
  static at::Tensor forward(
      AutogradContext* ctx,
      at::Tensor x,
      const at::Tensor& mask,
      const std::optional<at::Tensor>& x_before) {
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["mask_dtype"] = mask.scalar_type();
    ctx->save_for_backward(
        {x_before.value_or(at::Tensor()), x.requires_grad() ? mask : at::Tensor()});
    call_fake_sparsity__below_autograd(x, mask);
    // The kernel ran below ADInplaceOrView, which is where aten bumps the
    // version counter of in-place outputs.
    torch::autograd::increment_version(x);
    ctx->mark_dirty({x});
    return x;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    variable_list result = mask_product_backward(ctx, grads[0], saved[0], saved[1]);
    result.emplace_back(); // x_before gets no gradient of its own
    return result;
  }
};

// Whether a graph node is needed. Without one, the Function machinery (a
// context, saved dtypes) is skipped: it costs microseconds per call, which
// shows on small tensors and in inference.
bool needs_graph(const at::Tensor& x, const at::Tensor& mask) {
  return at::GradMode::is_enabled() && (x.requires_grad() || mask.requires_grad());
}

at::Tensor fake_sparsity_autograd(const at::Tensor& x, const at::Tensor& mask) {
  if (!needs_graph(x, mask)) {
    return call_fake_sparsity_below_autograd(x, mask);
  }
  return FakeSparsityFunction::apply(x, mask);
}

at::Tensor& fake_sparsity__autograd(at::Tensor& x, const at::Tensor& mask) {
  // Refuse before writing: once the kernel ran, x could not be restored.
  TORCH_CHECK(
      !(at::GradMode::is_enabled() && x.requires_grad() && x.is_leaf()),
      "fake_sparsity_: x is a leaf tensor that requires grad and cannot be "
      "modified in place; use fake_sparsity, or call it under torch.no_grad()");
  if (!needs_graph(x, mask)) {
    call_fake_sparsity__below_autograd(x, mask);
    torch::autograd::increment_version(x);
    return x;
  }
  // Taken here, with grad mode on, so that it is differentiable.
  std::optional<at::Tensor> x_before;
  if (mask.requires_grad()) {
    x_before = x.clone();
  }
  FakeSparsityInplaceFunction::apply(x, mask, x_before);
  return x;
}

} // namespace

TORCH_LIBRARY_IMPL(sparsity, Autograd, m) {
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity"),
      TORCH_FN(fake_sparsity_autograd));
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity_"),
      TORCH_FN(fake_sparsity__autograd));
}

} // namespace ops
} // namespace sparsity
