#include "classes/fake_sparsity_class.h"

#include "ops/fake_sparsity.h"
#include "ops/fake_sparsity_common.h"

#include <ATen/ops/count_nonzero.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <limits>
#include <utility>

namespace sparsity {

namespace {

void check_mask(const char* where, const at::Tensor& mask) {
  TORCH_CHECK(mask.defined(), where, ": mask is an undefined tensor");
  TORCH_CHECK(
      mask.layout() == at::kStrided,
      where,
      ": mask must be a strided (dense) tensor, but got layout ",
      mask.layout());
  TORCH_CHECK(
      ops::detail::is_supported_mask_dtype(mask.scalar_type()),
      where,
      ": mask must be bool, uint8 or floating (float32, float64, float16, bfloat16), but got ",
      mask.scalar_type());
}

} // namespace

FakeSparsity::FakeSparsity(at::Tensor mask) {
  check_mask("FakeSparsity", mask);
  mask_ = std::move(mask);
}

void FakeSparsity::move_mask_to(const c10::Device& device) {
  std::lock_guard<std::mutex> lock(move_mutex_);
  if (mask_.device() == device) {
    return;
  }
  // set_data swaps the storage under the same TensorImpl, as nn.Module.to
  // does for parameters: whoever holds the mask keeps holding it.
  c10::AutoGradMode no_grad(false);
  mask_.set_data(mask_.to(device));
}

at::Tensor FakeSparsity::forward(const at::Tensor& x) {
  TORCH_CHECK(x.defined(), "FakeSparsity.forward: x is an undefined tensor");
  if (x.device() != mask_.device()) {
    if (x.is_meta()) {
      // Shape propagation only: never give up the real mask for a meta one.
      return ops::fake_sparsity(x, mask_.to(x.device()));
    }
    move_mask_to(x.device());
  }
  return ops::fake_sparsity(x, mask_);
}

at::Tensor FakeSparsity::mask() const {
  return mask_;
}

void FakeSparsity::update_mask(const at::Tensor& m) {
  check_mask("FakeSparsity.update_mask", m);
  TORCH_CHECK(
      m.sizes() == mask_.sizes(),
      "FakeSparsity.update_mask: new mask shape ",
      m.sizes(),
      " must equal the held mask shape ",
      mask_.sizes());
  c10::AutoGradMode no_grad(false);
  mask_.copy_(m);
}

c10::Dict<std::string, at::Tensor> FakeSparsity::state_dict() const {
  return c10::Dict<std::string, at::Tensor>();
}

double FakeSparsity::sparsity_level() const {
  const int64_t numel = mask_.numel();
  if (numel == 0) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  const int64_t nonzero = at::count_nonzero(mask_).item<int64_t>();
  return static_cast<double>(numel - nonzero) / static_cast<double>(numel);
}

FakeSparsity::State FakeSparsity::get_state() const {
  // A copy, not the held tensor: TorchScript's deepcopy passes this state
  // straight to __setstate__, and a deep copy must not share its mask.
  at::Tensor mask_copy;
  {
    c10::AutoGradMode no_grad(false);
    mask_copy = mask_.clone();
  }
  mask_copy.set_requires_grad(mask_.requires_grad());
  c10::Dict<std::string, at::Tensor> tensors;
  tensors.insert("mask", std::move(mask_copy));
  return State(kStateVersion, std::move(tensors));
}

c10::intrusive_ptr<FakeSparsity> FakeSparsity::from_state(State state) {
  const int64_t version = std::get<0>(state);
  TORCH_CHECK(
      version == kStateVersion,
      "FakeSparsity: cannot load a pickled state of format version ",
      version,
      "; this build reads version ",
      kStateVersion,
      " (was the model saved by a newer torch-sparsity?)");
  const auto& tensors = std::get<1>(state);
  TORCH_CHECK(
      tensors.contains("mask"),
      "FakeSparsity: malformed pickled state: version 1 needs a 'mask' entry");
  TORCH_CHECK(
      tensors.size() == 1,
      "FakeSparsity: malformed pickled state: version 1 holds only 'mask', but got ",
      tensors.size(),
      " entries");
  return c10::make_intrusive<FakeSparsity>(tensors.at("mask"));
}

TORCH_LIBRARY_FRAGMENT(sparsity, m) {
  m.class_<FakeSparsity>("FakeSparsity")
      .def(torch::init<at::Tensor>())
      .def("forward", &FakeSparsity::forward)
      .def("update_mask", &FakeSparsity::update_mask)
      .def("state_dict", &FakeSparsity::state_dict)
      .def("sparsity_level", &FakeSparsity::sparsity_level)
      .def("get_mask", &FakeSparsity::mask)
      .def_property("mask", &FakeSparsity::mask)
      .def_pickle(
          [](const c10::intrusive_ptr<FakeSparsity>& self) {
            return self->get_state();
          },
          [](FakeSparsity::State state) {
            return FakeSparsity::from_state(std::move(state));
          });
}

} // namespace sparsity
