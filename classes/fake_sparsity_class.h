#pragma once

// torch.classes.sparsity.FakeSparsity: the TorchScript counterpart of
// torch.ao.pruning's FakeSparsity parametrization. It holds a mask and
// returns mask * x; scripted modules keep it as an attribute.

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <tuple>

namespace sparsity {

class FakeSparsity : public torch::CustomClassHolder {
 public:
  // Version of the pickled state written by this build.
  static constexpr int64_t kStateVersion = 1;
  // (version, named tensors); version 1 holds {"mask": mask}.
  using State = std::tuple<int64_t, c10::Dict<std::string, at::Tensor>>;

  explicit FakeSparsity(at::Tensor mask);

  // mask * x. If x is on another device than the mask (the owning module was
  // moved), the held mask first moves to x's device, keeping its identity.
  at::Tensor forward(const at::Tensor& x);

  // The very tensor held: in-place edits of it change later forwards.
  at::Tensor mask() const;

  // Copies m into the held mask in place; on error nothing changes.
  void update_mask(const at::Tensor& m);

  // Empty, as in torch.ao.pruning: the owner's state dict carries no masks.
  c10::Dict<std::string, at::Tensor> state_dict() const;

  // Fraction of mask entries equal to zero (NaN for an empty mask, as
  // (mask == 0).float().mean() gives).
  double sparsity_level() const;

  State get_state() const;
  static c10::intrusive_ptr<FakeSparsity> from_state(State state);

 private:
  void move_mask_to(const c10::Device& device);

  at::Tensor mask_;
  // Serialises the one-time device move of the mask across forward threads.
  std::mutex move_mutex_;
};

} // namespace sparsity
