#pragma once

// Input checks, type rules and dtype dispatch shared by every kernel of
// fake_sparsity, fake_sparsity_ and fake_structured_sparsity, so all
// dispatch keys agree on what is an error and on the result dtype.

#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/mul.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/SmallVector.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

namespace sparsity {
namespace ops {
namespace detail {

inline bool is_supported_x_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
      t == at::kBFloat16;
}

inline bool is_supported_mask_dtype(at::ScalarType t) {
  return t == at::kBool || t == at::kByte || is_supported_x_dtype(t);
}

// "[3, 4]". Symbolic shapes (torch.compile) print as SymInts; concrete ones
// as plain integers (printing a SymIntArrayRef crashed under torch 2.11).
inline std::string shape_string(const at::Tensor& t) {
  if (!t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    return c10::str(t.sizes());
  }
  return c10::str(t.sym_sizes());
}

// Checks what every operator of this library requires of x and mask apart
// from their shapes; op_name starts each message.
inline void check_mask_operands(
    const char* op_name,
    const at::Tensor& x,
    const at::Tensor& mask) {
  TORCH_CHECK(x.defined(), op_name, ": x is an undefined tensor");
  TORCH_CHECK(mask.defined(), op_name, ": mask is an undefined tensor");
  TORCH_CHECK(
      is_supported_x_dtype(x.scalar_type()),
      op_name,
      ": x must be a floating tensor (float32, float64, float16 or bfloat16), but got ",
      x.scalar_type());
  TORCH_CHECK(
      is_supported_mask_dtype(mask.scalar_type()),
      op_name,
      ": mask must be bool, uint8 or floating (float32, float64, float16, bfloat16), but got ",
      mask.scalar_type());
  TORCH_CHECK(
      x.device() == mask.device(),
      op_name,
      ": x and mask must be on the same device, but x is on ",
      x.device(),
      " and mask is on ",
      mask.device());
  TORCH_CHECK(
      x.layout() == at::kStrided && mask.layout() == at::kStrided,
      op_name,
      ": x and mask must be strided (dense) tensors, but got x layout ",
      x.layout(),
      " and mask layout ",
      mask.layout());
}

// fake_sparsity and fake_sparsity_: a mask of x's very shape.
inline void check_fake_sparsity_inputs(
    const char* op_name,
    const at::Tensor& x,
    const at::Tensor& mask) {
  check_mask_operands(op_name, x, mask);
  TORCH_CHECK(
      x.sym_sizes().equals(mask.sym_sizes()),
      op_name,
      ": mask shape ",
      shape_string(mask),
      " must equal x shape ",
      shape_string(x),
      " (no broadcasting)");
}

// fake_structured_sparsity: one mask entry per slice x[i] along dim 0, the
// mask of shape [x.size(0)] (torch.ao.pruning's FakeStructuredSparsity).
inline void check_fake_structured_sparsity_inputs(
    const char* op_name,
    const at::Tensor& x,
    const at::Tensor& mask) {
  check_mask_operands(op_name, x, mask);
  TORCH_CHECK(
      x.dim() >= 1,
      op_name,
      ": x must have at least one dimension (the mask selects slices along dim 0), but got a 0-d tensor");
  TORCH_CHECK(
      mask.dim() == 1 && mask.sym_size(0) == x.sym_size(0),
      op_name,
      ": mask shape ",
      shape_string(mask),
      " must be [x.size(0)] for x of shape ",
      shape_string(x),
      ": one entry per slice along dim 0");
}

// The row mask as mask.reshape(-1, 1, ...) with x's number of dimensions:
// the contract's definition broadcasts it so against x. A bool or uint8 mask
// comes as x's dtype (the result's, which holds 0 to 255 exactly, so the same
// bits): aten's mul then skips its slower loop for mixed dtypes.
inline at::Tensor row_mask_view(const at::Tensor& mask, const at::Tensor& x) {
  c10::SmallVector<int64_t, 6> shape(x.dim(), 1);
  shape[0] = mask.size(0); // not -1, which an empty mask leaves ambiguous
  const bool byte_mask = mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte;
  return (byte_mask ? mask.to(x.scalar_type()) : mask).reshape(shape);
}

// out = mask * x by aten's mul, out allocated by the caller (x itself in
// place, rounding as x.mul_(mask) does): the contract's own definition, so
// the same bits, for every case no hand-written kernel beats.
inline void mul_into(const at::Tensor& out, const at::Tensor& x, const at::Tensor& mask) {
  at::Tensor result = out;
  at::mul_out(result, mask, x);
}

// dtype of mask * x under PyTorch's promotion (same ndim, so no 0-dim rule).
inline at::ScalarType fake_sparsity_result_type(
    const at::Tensor& x,
    const at::Tensor& mask) {
  return c10::promoteTypes(x.scalar_type(), mask.scalar_type());
}

// Promotion of the element types at compile time: integral masks keep x's
// type, two floating types follow c10::promoteTypes.
template <typename x_t, typename mask_t>
struct promoted {
  static constexpr bool mask_is_integral =
      std::is_same_v<mask_t, bool> || std::is_same_v<mask_t, uint8_t>;
  using type = std::conditional_t<
      mask_is_integral || std::is_same_v<x_t, mask_t>,
      x_t,
      std::conditional_t<
          std::is_same_v<x_t, double> || std::is_same_v<mask_t, double>,
          double,
          float>>;
};
template <typename x_t, typename mask_t>
using promoted_t = typename promoted<x_t, mask_t>::type;

// In-place writes into x: x must not write one element twice, and mask must
// not partly alias x. Needs real storage, so the device kernels call it. An
// inference tensor can be written only in inference mode, as aten's in-place
// operators require (it has no version counter that would tell autograd);
// it reaches the device kernels directly, as it has no autograd key.
inline void check_inplace_overlap(
    const char* op_name,
    const at::Tensor& x,
    const at::Tensor& mask) {
  TORCH_CHECK(
      !x.is_inference() || c10::InferenceMode::is_enabled(),
      op_name,
      ": x is an inference tensor, which can be modified in place only in inference mode "
      "(torch.inference_mode()); clone() it first");
  TORCH_CHECK(
      at::has_internal_overlap(x) != at::MemOverlap::Yes,
      op_name,
      ": x has several elements in one memory location (an expanded tensor?), "
      "so writing into it in place is ambiguous; clone() it first");
  at::assert_no_partial_overlap(x, mask);
}

// True when x, mask and out can be walked as one flat array each, element i
// of one matching element i of the others: contiguous, or one dense layout
// (channels-last, any dense permutation) shared by all three.
inline bool share_dense_layout(
    const at::Tensor& x,
    const at::Tensor& mask,
    const at::Tensor& out) {
  if (x.is_contiguous() && mask.is_contiguous() && out.is_contiguous()) {
    return true;
  }
  return x.is_non_overlapping_and_dense() && mask.strides() == x.strides() &&
      out.strides() == x.strides();
}

// Calls f with a value of the C++ type of a floating dtype (the value is only
// a type tag).
template <typename F>
void dispatch_floating(at::ScalarType t, const char* op_name, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, op_name, ": unsupported floating dtype ", t);
  }
}

// The same for every mask dtype: bool, uint8 and the floating ones.
template <typename F>
void dispatch_mask(at::ScalarType t, const char* op_name, F&& f) {
  switch (t) {
    case at::kBool:
      return f(bool{});
    case at::kByte:
      return f(uint8_t{});
    default:
      return dispatch_floating(t, op_name, std::forward<F>(f));
  }
}

// Calls f(out_tag, x_tag, mask_tag), values of the C++ types of out, x and
// mask. out is either a new tensor of the promoted dtype or x itself (in
// place), so only those two output types are instantiated.
template <typename F>
void dispatch_fake_sparsity_types(
    const char* op_name,
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mask,
    F&& f) {
  dispatch_floating(x.scalar_type(), op_name, [&](auto x_tag) {
    using x_t = decltype(x_tag);
    dispatch_mask(mask.scalar_type(), op_name, [&](auto mask_tag) {
      using mask_t = decltype(mask_tag);
      using promoted = promoted_t<x_t, mask_t>;
      if (out.scalar_type() == x.scalar_type()) {
        f(x_t{}, x_t{}, mask_t{});
      } else {
        TORCH_INTERNAL_ASSERT(
            out.scalar_type() == c10::CppTypeToScalarType<promoted>::value,
            op_name,
            ": unexpected output dtype ",
            out.scalar_type());
        f(promoted{}, x_t{}, mask_t{});
      }
    });
  });
}

} // namespace detail
} // namespace ops
} // namespace sparsity
