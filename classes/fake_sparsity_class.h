#pragma once

// torch.classes.sparsity.FakeSparsity: the TorchScript counterpart of
// torch.ao.pruning's FakeSparsity parametrization. It holds a mask and
// returns mask * x; scripted modules keep it as an attribute.

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <mutex>
#include <optional>
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
  //
  // Inference cache: when no autograd graph is needed, the result is kept,
  // and a later call with the very same x (same tensor object, storage,
  // offset, sizes, strides, dtype, device), unchanged since (same version
  // counter value; likewise the mask), returns it instead of recomputing.
  // What a caller gets is a copy-on-write clone of the kept result: it
  // shares memory until someone writes to it, so no caller can change the
  // cache or another caller's result. Costs one tensor of the result's size
  // per object while enabled. CPU tensors only. Writes that bypass version
  // counters (x.data, .numpy(), storage-level writes) are not seen: call
  // clear_cache() after them, or turn the cache off.
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

  // The inference cache: on by default; turning it off frees the kept
  // result. Neither the setting nor the result is pickled: a loaded or
  // deep-copied object starts with an empty, enabled cache.
  void set_cache_enabled(bool enabled);
  bool cache_enabled() const;
  void clear_cache();
  // Forwards answered from the cache since construction.
  int64_t cache_hits() const;

  // For torch.export and torch.compile: (("mask", the held mask),), from
  // which the fake class that torch_sparsity registers in Python rebuilds a
  // stand-in holding a fake mask.
  std::tuple<std::tuple<std::string, at::Tensor>> obj_flatten() const;

  State get_state() const;
  static c10::intrusive_ptr<FakeSparsity> from_state(State state);

 private:
  // Who a tensor was and what it held when a result was computed from it.
  // Weak references pin the addresses (so a new tensor or storage cannot
  // reuse them and pass for the old one) without keeping anything alive.
  struct Stamp {
    explicit Stamp(const at::Tensor& t);
    bool matches(const at::Tensor& t) const;

    c10::weak_intrusive_ptr<c10::TensorImpl> impl;
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    int64_t storage_offset;
    c10::SmallVector<int64_t, 5> sizes;
    c10::SmallVector<int64_t, 5> strides;
    at::ScalarType dtype;
    c10::Device device;
    uint32_t version;
  };
  struct CacheEntry {
    Stamp x;
    Stamp mask;
    at::Tensor result;
  };

  void move_mask_to(const c10::Device& device);

  at::Tensor mask_;
  // Guards the one-time device move of the mask and everything below it,
  // across forward threads.
  mutable std::mutex mutex_;
  std::optional<CacheEntry> cache_;
  bool cache_enabled_ = true;
  int64_t cache_hits_ = 0;
};

} // namespace sparsity
