// Autograd of fake_sparsity, fake_sparsity_ and fake_structured_sparsity,
// registered in C++ on the Autograd key so that a C++ program that loads a
// scripted model can backpropagate through it. The backward formulas call
// the operators themselves, so they are differentiable again (double
// backward).

#include "ops/fake_sparsity.h"
#include "ops/registration.h"

#include <ATen/ExpandUtils.h>
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

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor call_fake_sparsity_below_autograd(const at::Tensor& x, const at::Tensor& mask) {
  static auto op = find_op<decltype(fake_sparsity)>("sparsity::fake_sparsity");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, mask);
}

at::Tensor& call_fake_sparsity__below_autograd(at::Tensor& x, const at::Tensor& mask) {
  static auto op = find_op<decltype(fake_sparsity_)>("sparsity::fake_sparsity_");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, mask);
}

// What differs between the operators' autograd: how the mask applies, and
// how a gradient of x's shape sums back to the mask's shape.
struct ElementMask {
  static at::Tensor below_autograd(const at::Tensor& x, const at::Tensor& mask) {
    return call_fake_sparsity_below_autograd(x, mask);
  }
  static at::Tensor apply(const at::Tensor& x, const at::Tensor& mask) {
    return fake_sparsity(x, mask);
  }
  static at::Tensor to_mask_shape(const at::Tensor& grad) {
    return grad;
  }
};

struct RowMask {
  static at::Tensor below_autograd(const at::Tensor& x, const at::Tensor& mask) {
    static auto op = find_op<decltype(fake_structured_sparsity)>("sparsity::fake_structured_sparsity");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, mask);
  }
  static at::Tensor apply(const at::Tensor& x, const at::Tensor& mask) {
    return fake_structured_sparsity(x, mask);
  }
  // Summed as autograd sums the gradient of mask.reshape(-1, 1, ...) * x.
  static at::Tensor to_mask_shape(const at::Tensor& grad) {
    if (grad.dim() == 1) {
      return grad;
    }
    c10::SmallVector<int64_t, 6> row_shape(grad.dim(), 1);
    row_shape[0] = grad.size(0);
    return at::sum_to(grad, row_shape).reshape({grad.size(0)});
  }
};

// d(mask * x)/dx = grad * mask and d/dmask = grad * x (summed to the mask's
// shape), each cast back to the dtype of the input it belongs to (the result
// may have a wider dtype).
template <typename Kind>
variable_list mask_product_backward(
    AutogradContext* ctx,
    const at::Tensor& grad,
    const at::Tensor& x_value,
    const at::Tensor& mask) {
  at::Tensor grad_x, grad_mask;
  if (grad.defined()) {
    if (ctx->needs_input_grad(0)) {
      grad_x = Kind::apply(grad, mask)
                   .to(ctx->saved_data["x_dtype"].toScalarType());
    }
    if (ctx->needs_input_grad(1)) {
      grad_mask = Kind::to_mask_shape(fake_sparsity(grad, x_value))
                      .to(ctx->saved_data["mask_dtype"].toScalarType());
    }
  }
  return {grad_x, grad_mask};
}

template <typename Kind>
class MaskFunction : public torch::autograd::Function<MaskFunction<Kind>> {
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
    return Kind::below_autograd(x, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return mask_product_backward<Kind>(ctx, grads[0], saved[0], saved[1]);
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
    variable_list result = mask_product_backward<ElementMask>(ctx, grads[0], saved[0], saved[1]);
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

template <typename Kind>
at::Tensor mask_autograd(const at::Tensor& x, const at::Tensor& mask) {
  if (!needs_graph(x, mask)) {
    return Kind::below_autograd(x, mask);
  }
  return MaskFunction<Kind>::apply(x, mask);
}

at::Tensor& fake_sparsity__autograd(at::Tensor& x, const at::Tensor& mask) {
  // Refuse before writing: once the kernel ran, x could not be restored.
  TORCH_CHECK(
      !(at::GradMode::is_enabled() && x.requires_grad() && x.is_leaf()),
      "fake_sparsity_: x is a leaf tensor that requires grad and cannot be "
      "modified in place; use fake_sparsity, or call it under torch.no_grad()");
  // What aten's in-place operators refuse before writing too: a view of a
  // leaf that requires grad, an output of unbind() or split() (views that
  // cannot be rebased), ...
  torch::autograd::check_inplace(x, needs_graph(x, mask));
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

SPARSITY_LIBRARY_IMPL(Autograd, m) {
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity"),
      TORCH_FN(mask_autograd<ElementMask>));
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity_"),
      TORCH_FN(fake_sparsity__autograd));
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_structured_sparsity"),
      TORCH_FN(mask_autograd<RowMask>));
}

} // namespace ops
} // namespace sparsity
